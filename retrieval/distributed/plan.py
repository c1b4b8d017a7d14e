"""A distributed job's plan: every row to embed, numbered by the driver before any worker starts.

The driver hashes the records, leaves out what the index already holds (as `seesay index`
does) and takes one block of ids from the index's counter (`Index.reserve_ids`), numbering
the rows in the order a single-process run would: chunk by chunk of `COMMIT_EVERY` records,
a chunk's new images, then its new captions. On clean data both runs so give the same ids;
an image that turns out not to decode leaves its id (and its captions' ids) unused.
A retried batch recomputes the same ids, so a worker's output can be written more than
once and the commit keeps one copy of each id.

The plan is stored in the job folder (`plan.parquet`) with a fingerprint of the records,
the encoder and the index, so a rerun of the same command resumes it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import pyarrow as pa

from indexer import Index, NewItem
from retrieval.datasets import Record
from retrieval.ingest import COMMIT_EVERY, AddReport, KnownHashes, hashed_records, new_captions, new_images, stored_path

PLAN_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("kind", pa.string()),
        ("source_id", pa.string()),
        ("hash", pa.string()),
        ("path", pa.string()),  # an image's stored path; for a caption, its image's (for problem lines)
        ("text", pa.string()),
        ("split", pa.string()),
        ("image_hash", pa.string()),
    ]
)


# What planning finds out about the records, kept with the plan so that a resumed run reports it too.
SKIPPED = ("images_skipped_existing", "captions_skipped_existing", "problems")


def fingerprint(records: Sequence[Record], encoder_identity: str, index: Index) -> str:
    """sha256 of what decides a plan: the records (paths, captions, splits), the encoder and the index."""
    digest = hashlib.sha256(json.dumps([encoder_identity, str(index.directory.resolve())]).encode())
    for record in records:
        digest.update(json.dumps([record.image_name, str(record.image_path), record.captions, record.split]).encode())
    return digest.hexdigest()


@dataclass
class Plan:
    """The rows of one job, as a table in PLAN_SCHEMA (ids ascending), its fingerprint, and what planning skipped."""

    table: pa.Table
    fingerprint: str
    skipped: dict = field(default_factory=dict)  # AddReport's skip counts and problems while planning

    @property
    def n_rows(self) -> int:
        return self.table.num_rows

    @cached_property
    def _columns(self) -> tuple[dict[int, int], dict[str, list]]:
        position = {int(i): n for n, i in enumerate(self.table.column("id").to_pylist())}
        return position, {name: self.table.column(name).to_pylist() for name in PLAN_SCHEMA.names}

    def rows(self, ids: Sequence[int]) -> list[NewItem]:
        """The rows to store for `ids` (all in the plan), in the order given."""
        position, columns = self._columns
        rows = []
        for item_id in ids:
            n = position[int(item_id)]
            kind = columns["kind"][n]
            rows.append(
                NewItem(
                    kind,
                    columns["source_id"][n],
                    columns["hash"][n],
                    path=columns["path"][n] if kind == "image" else None,
                    text=columns["text"][n],
                    split=columns["split"][n],
                    image_hash=columns["image_hash"][n],
                )
            )
        return rows


def make_plan(index: Index, records: Sequence[Record], report: AddReport, key: str, workers: int = 4) -> Plan:
    """Hash `records`, keep what `index` lacks, number it with ids reserved from `index`; problems go to `report`."""
    planned: dict[str, set[str]] = {"image": set(), "caption": set()}

    def known(kind: str, hashes: Sequence[str]) -> dict[str, int]:  # committed, or planned by an earlier chunk
        found = index.ids_by_hash(kind, hashes)
        found.update({h: 0 for h in hashes if h in planned[kind]})
        return found

    columns: dict[str, list] = {name: [] for name in PLAN_SCHEMA.names if name != "id"}
    for start in range(0, len(records), COMMIT_EVERY):
        chunk = records[start : start + COMMIT_EVERY]
        _plan_chunk(chunk, known, report, workers, columns, planned)
    ids = index.reserve_ids(len(columns["kind"])) if columns["kind"] else []
    table = pa.table({"id": pa.array(ids, pa.int64()), **columns}, schema=PLAN_SCHEMA)
    skipped = {name: getattr(report, name) for name in SKIPPED}
    return Plan(table, key, skipped)


def _plan_chunk(
    chunk: Sequence[Record],
    known: KnownHashes,
    report: AddReport,
    workers: int,
    columns: dict[str, list],
    planned: dict[str, set[str]],
) -> None:
    """Append one chunk's new images, then its new captions, to `columns` (the single-process order)."""
    hashed = hashed_records(chunk, workers, report)
    firsts = new_images(hashed, known)
    captions = new_captions(hashed, firsts, {}, known, report)
    paths = {image_hash: stored_path(record.image_path) for image_hash, record in firsts.items()}
    for image_hash, record in firsts.items():
        _append(columns, "image", record.image_name, image_hash, paths[image_hash], None, record.split, None)
    for caption in captions:
        path = paths.get(caption.image_hash) or stored_path(caption.record.image_path)
        _append(columns, "caption", caption.record.image_name, caption.hash, path, caption.text, caption.record.split, caption.image_hash)
    planned["image"].update(firsts)
    planned["caption"].update(caption.hash for caption in captions)


def _append(columns: dict[str, list], *values) -> None:
    for name, value in zip(("kind", "source_id", "hash", "path", "text", "split", "image_hash"), values):
        columns[name].append(value)
