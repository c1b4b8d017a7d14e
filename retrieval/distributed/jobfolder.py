"""A distributed job's folder: its plan and the Parquet shards its workers wrote.

Each job has its own folder, named by its plan's fingerprint, under a jobs folder (by
default DIR/.jobs inside the index): rerunning the same command finds it and resumes.
Any path or URI pyarrow opens (a local or network-mounted folder, s3://, gs://, hdfs://):
on a cluster of several machines it must be storage every node reaches. Layout:

  plan.parquet          the numbered rows (`plan.PLAN_SCHEMA`), its fingerprint in the file's metadata
  shards/*.parquet      id, vector, status ("ok" or "bad"), reason: one file per block a worker wrote

Shards are only ever added. A file a killed writer left half-written cannot be read and
is ignored (its block was written again by the retry); a row written twice by a retried
batch is the same row again, and readers keep its first copy.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from retrieval.distributed.plan import PLAN_SCHEMA, Plan

log = logging.getLogger("seesay.distributed")

PLAN_FILE = "plan.parquet"
SHARDS = "shards"
FINGERPRINT_KEY = b"seesay.fingerprint"
SKIPPED_KEY = b"seesay.skipped"


def shard_schema(dim: int) -> pa.Schema:
    """What a worker writes per row: the planned id, its vector, and whether its input could be read."""
    return pa.schema(
        [("id", pa.int64()), ("vector", pa.list_(pa.float32(), dim)), ("status", pa.string()), ("reason", pa.string())]
    )


@dataclass
class Shard:
    """One shard file's rows: ids, (n, dim) vectors, statuses and reasons."""

    ids: np.ndarray
    vectors: np.ndarray
    ok: np.ndarray
    reasons: list[str]


class JobFolder:
    """The plan and shards of one job, on any filesystem pyarrow opens."""

    def __init__(self, uri: str) -> None:
        try:
            self.fs, self.path = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, ValueError):  # a plain relative path
            self.fs, self.path = pafs.LocalFileSystem(), pafs.LocalFileSystem().normalize_path(uri)
        self.uri = uri
        self.shards_path = f"{self.path.rstrip('/')}/{SHARDS}"

    def _plan_path(self) -> str:
        return f"{self.path.rstrip('/')}/{PLAN_FILE}"

    def load_plan(self) -> Plan | None:
        """The stored plan, or None when there is none (or only an unreadable one)."""
        try:
            table = pq.read_table(self._plan_path(), filesystem=self.fs)
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as exc:
            log.warning("ignoring the unreadable plan in %s: %s", self.uri, exc)
            return None
        meta = table.schema.metadata or {}
        skipped = json.loads(meta.get(SKIPPED_KEY, b"{}"))
        return Plan(table.select(PLAN_SCHEMA.names).cast(PLAN_SCHEMA), meta.get(FINGERPRINT_KEY, b"").decode(), skipped)

    def save_plan(self, plan: Plan) -> None:
        """Write the plan (under a temporary name, then moved into place)."""
        self.fs.create_dir(self.shards_path, recursive=True)
        table = plan.table.replace_schema_metadata(
            {FINGERPRINT_KEY: plan.fingerprint.encode(), SKIPPED_KEY: json.dumps(plan.skipped).encode()}
        )
        staging = self._plan_path() + ".writing"
        pq.write_table(table, staging, filesystem=self.fs)
        self.fs.move(staging, self._plan_path())

    def clear(self) -> None:
        """Remove the job folder (after its commit, or when its plan is for other data)."""
        try:
            self.fs.delete_dir(self.path)
        except FileNotFoundError:
            pass

    def shard_files(self) -> list[str]:
        try:
            found = self.fs.get_file_info(pafs.FileSelector(self.shards_path, recursive=True))
        except FileNotFoundError:
            return []
        return sorted(info.path for info in found if info.is_file and info.path.endswith(".parquet"))

    def shards(self, dim: int) -> Iterator[Shard]:
        """Every readable shard file's rows, in file-name order; unreadable files are logged and skipped."""
        schema = shard_schema(dim)
        for path in self.shard_files():
            try:
                table = pq.read_table(path, filesystem=self.fs, schema=schema)
            except (OSError, pa.ArrowException) as exc:
                log.warning("ignoring shard %s, which cannot be read (a writer was killed?): %s", path, exc)
                continue
            vectors = table.column("vector").combine_chunks()
            flat = vectors.values.to_numpy(zero_copy_only=False) if len(vectors) else np.zeros(0, np.float32)
            yield Shard(
                ids=table.column("id").to_numpy(),
                vectors=flat.reshape(len(vectors), dim),
                ok=np.array([s == "ok" for s in table.column("status").to_pylist()], dtype=bool),
                reasons=[r or "" for r in table.column("reason").to_pylist()],
            )

    def done_ids(self, dim: int) -> set[int]:
        """Ids some readable shard already holds."""
        done: set[int] = set()
        for shard in self.shards(dim):
            done.update(shard.ids.tolist())
        return done
