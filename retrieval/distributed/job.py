"""`seesay index --engine ray`: plan on the driver, embed on a Ray cluster, commit on the driver.

1. Plan (`plan.py`): hash the records, leave out what the index holds, number the rest with
   ids reserved from the index. A rerun of the same command finds the stored plan and reuses it.
2. Embed (`workers.py`): Ray Data reads the rows no shard holds yet, decodes images on CPU
   tasks, encodes in a pool of actors each holding the encoder, and writes Parquet shards
   to the job folder. Retried tasks and restarted actors are Ray's; a row written twice is
   harmless.
3. Commit: read the shards, keep one copy of each id, drop bad images (and their captions)
   with a problem line each, and store the rest through `Index.add_vectors` under their
   planned ids, images before captions; then remove the job folder.
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval.collection import Collection, store_rows
from retrieval.datasets import Record
from retrieval.distributed.jobfolder import JobFolder
from retrieval.distributed.plan import SKIPPED, Plan, fingerprint, make_plan
from retrieval.distributed.workers import EmbedActor, decode_batch, save_encoder_files, worker_transform
from retrieval.errors import SeesayError
from retrieval.ingest import COMMIT_EVERY, AddReport, bad_image_problem

JOBS_DIR = ".jobs"  # inside the index folder, unless --job-dir says otherwise
ROWS_PER_BLOCK = 1024  # a block is what one task writes as one shard: the unit a resumed job skips


@dataclass
class RayAddReport(AddReport):
    """An `AddReport` plus what the job embedded now and what it reused from an earlier, interrupted run."""

    embedded: int = 0
    reused: int = 0
    job_dir: str = ""
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of plan, embed and commit


def index_with_ray(
    collection: Collection,
    records: Sequence[Record],
    *,
    address: str | None = None,
    jobs_dir: str | None = None,
    actors: int = 2,
    batch_size: int = 64,
    progress: bool = False,
) -> RayAddReport:
    """Index `records` into `collection` on a Ray cluster (`address`: "auto", HOST:PORT, or None for a local Ray)."""
    index = collection.index
    index.check_writable("add")
    encoder = collection.encoder
    key = fingerprint(records, encoder.identity, index)
    folder = JobFolder(f"{(jobs_dir or str(index.directory / JOBS_DIR)).rstrip('/')}/{key[:16]}")
    report = RayAddReport(job_dir=folder.uri)
    started = time.perf_counter()
    plan = folder.load_plan()
    if plan is None or plan.fingerprint != key:
        plan = make_plan(index, records, report, key)
        folder.save_plan(plan)
    else:
        for name in SKIPPED:
            setattr(report, name, plan.skipped.get(name, getattr(report, name)))
    dim = index.built_by.dim
    report.seconds["plan"] = time.perf_counter() - started
    if plan.n_rows:
        done = folder.done_ids(dim)
        todo = plan.table.filter(pc.invert(pc.is_in(plan.table.column("id"), pa.array(sorted(done), pa.int64()))))
        report.reused, report.embedded = plan.n_rows - todo.num_rows, todo.num_rows
        if todo.num_rows:
            _embed(todo, folder, collection, address, actors, batch_size, progress)
        report.seconds["embed"] = time.perf_counter() - started - report.seconds["plan"]
        _commit(collection, plan, folder, report, dim)
    folder.clear()
    report.seconds["total"] = time.perf_counter() - started
    return report


def _ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise SeesayError("--engine ray needs Ray Data: pip install 'seesay[ray]'") from exc
    return ray


def _embed(todo: pa.Table, folder: JobFolder, collection: Collection, address: str | None, actors: int, batch_size: int, progress: bool) -> None:
    """Run the Ray Data job over the rows of `todo`, writing shards into `folder`."""
    # Ray prints its nodes' news ("(raylet) ...") on stdout, which belongs to --json
    with _stdout_to_stderr(), _connected(address, actors) as ray:
        _run_job(ray, todo, folder, collection, actors, batch_size, progress)


@contextmanager
def _connected(address: str | None, actors: int) -> Iterator:
    """Ray for the block: the one this process has joined already, else the cluster at `address`, else
    a Ray started on this machine for the block and stopped after it.

    The local Ray is one node with every core (and room for `actors` actors beside the decode
    and write tasks), started the patient way of `local_cluster`: plain `ray.init()` aborts
    when a busy machine starts its daemons slowly.
    """
    if address is None:
        from retrieval.distributed.local_cluster import local_cluster  # before Ray: it sets the environment a local Ray needs
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    with ExitStack() as stack:
        if address is None:
            cores = max(os.cpu_count() or 1, actors + 2)
            address = stack.enter_context(local_cluster(workers=0, head_cpus=cores, object_store=None)).address
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
        stack.callback(ray.shutdown)
        yield ray


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send whatever is written to file descriptor 1 (by Python or by Ray's threads) to stderr for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _run_job(ray, todo: pa.Table, folder: JobFolder, collection: Collection, actors: int, batch_size: int, progress: bool) -> None:
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        context.print_on_execution_start = False
        files = ray.put(save_encoder_files(Path(collection.index.artefact_dir)))
        blocks = max(2 * actors, math.ceil(todo.num_rows / ROWS_PER_BLOCK))
        # As many blocks as it takes for every actor to get work (Ray would otherwise keep small inputs in one block).
        rows = ray.data.from_arrow(todo.select(["id", "kind", "path", "text"]), override_num_blocks=blocks)
        decoded = rows.map_batches(
            decode_batch, fn_kwargs={"transform": worker_transform(collection.encoder)},
            batch_size=batch_size, batch_format="numpy", num_cpus=1, max_retries=4,
        )
        embedded = decoded.map_batches(
            EmbedActor, fn_constructor_args=([files], batch_size), batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors), num_cpus=1,
            max_restarts=-1, max_task_retries=-1,
        )
        embedded.write_parquet(folder.shards_path, filesystem=folder.fs)
    except Exception as exc:  # Ray wraps a worker's failure; the job folder keeps what was written
        if isinstance(exc, SeesayError):
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SeesayError(f"the Ray job failed ({reason}); shards written so far are kept in {folder.uri}: "
                          "run the same command again to embed only the rest") from exc


def _commit(collection: Collection, plan: Plan, folder: JobFolder, report: RayAddReport, dim: int) -> None:
    """Store every planned row the shards hold, one copy per id, images first; SeesayError if rows are missing."""
    planned_ids = plan.table.column("id").to_numpy()
    kinds = dict(zip(planned_ids.tolist(), plan.table.column("kind").to_pylist()))
    missing = set(kinds) - folder.done_ids(dim)
    if missing:
        raise SeesayError(f"{len(missing)} planned rows have no vectors in {folder.uri}; run the same command again to embed them")
    info = {int(i): n for n, i in enumerate(planned_ids)}
    sources, paths, hashes, image_hashes = (plan.table.column(c).to_pylist() for c in ("source_id", "path", "hash", "image_hash"))
    bad: set[str] = set()  # hashes of images that could not be decoded
    for kind in ("image", "caption"):
        seen: set[int] = set()
        pending = _Pending(collection, plan, report)
        for shard in folder.shards(dim):
            for j, item_id in enumerate(shard.ids.tolist()):
                if kinds.get(item_id) != kind or item_id in seen:
                    continue
                seen.add(item_id)
                n = info[item_id]
                if not shard.ok[j]:
                    bad.add(hashes[n])
                    report.problems.append(bad_image_problem(sources[n], paths[n], shard.reasons[j]))
                elif kind == "caption" and image_hashes[n] in bad:
                    continue  # its image was reported
                else:
                    pending.add(item_id, shard.vectors[j])
        pending.flush()


class _Pending:
    """Rows collected from the shards, stored `COMMIT_EVERY` at a time in ascending id order."""

    def __init__(self, collection: Collection, plan: Plan, report: AddReport) -> None:
        self.collection, self.plan, self.report = collection, plan, report
        self.ids: list[int] = []
        self.vectors: list[np.ndarray] = []

    def add(self, item_id: int, vector: np.ndarray) -> None:
        self.ids.append(item_id)
        self.vectors.append(vector)
        if len(self.ids) >= COMMIT_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        order = np.argsort(self.ids, kind="stable")
        ids = [self.ids[i] for i in order]
        store_rows(self.collection.index, self.plan.rows(ids), np.stack([self.vectors[i] for i in order]), self.report, ids=ids)
        self.ids, self.vectors = [], []
