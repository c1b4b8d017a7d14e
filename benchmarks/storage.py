"""`seesay bench storage`: what an add costs as an index grows, and whether segments search like one index.

1. Add N precomputed random unit vectors (512-d) as image rows through `Index.add_vectors`,
   8,192 per commit (each commit its own transaction, as `seesay index` makes them), into
   a fresh SQLite index. Bytes written are the process's write() bytes (/proc/self/io
   `wchar`: segment files, the SQLite database and its WAL, merges), counted over
   the adds and the background merges they start (from before the first add to after the last
   merge); the vectors are made before each call, outside the timing. Reported:
   bytes written / the vectors' bytes (target ≤ 3 at 1M), and the add rate of the last
   100k items over that of the first 100k (target ≥ 0.7; with --quick, the first and last
   tenth), in wall time and in the adding thread's CPU time (merges run in another thread).
2. 1,000 random queries, exact top-10, on the index as the adds left it (several
   segments) and again after `compact(everything=True)` (one segment): identical ids?
3. PostgreSQL: the same adds, of 100k rows, into a temporary server (fsync on): rows/s, with 512-d
   vectors (the whole add) and with 4-d ones (the rows' cost: COPY, look-ups, commit), per second of
   wall time and per CPU second of this process and the server's together (the wall rate of an
   unloaded machine, fsync waits aside: on a shared one the wall rate is the machine's load).

Each row's content hash is a sha256 hex digest, as seesay's own adds store (`--hashes content`): random
keys, which a database index on the hashes would take at random places (a page per row once it has more
pages than a commit has rows: what format 2's unique (kind, hash) index cost). `--hashes sequential`
numbers them instead, as this benchmark did before; with the segments' hash key tables both should cost alike.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.report import figure, machine, save_plot
from indexer import Index, NewItem
from indexer.items import BuiltBy

NAME = "storage"
log = logging.getLogger(__name__)
SIZES = {"full": 1_000_000, "quick": 40_000}
HASHES = ("content", "sequential")


def written_bytes() -> int:
    """Bytes this process has passed to write() so far (Linux /proc/self/io), or 0 elsewhere."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _artefact(dim: int) -> Callable[[Path], BuiltBy]:
    def save(folder: Path) -> BuiltBy:
        folder.mkdir(parents=True, exist_ok=True)
        return BuiltBy("bench-random", "bench-random#0", 1, dim)

    return save


def unit_chunk(seed: int, n: int, dim: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def item_hash(i: int, hashes: str) -> str:
    """Row i's content hash: a sha256 hex digest ("content"), or i in hex ("sequential")."""
    return hashlib.sha256(f"item{i}".encode()).hexdigest() if hashes == "content" else f"{i:016x}"


def add_all(
    index: Index, n: int, commit: int, dim: int, server_cpu: Callable[[], float] = lambda: 0.0, hashes: str = "content"
) -> list[dict[str, float]]:
    """Add n image rows with random vectors, `commit` per call; per call: items, seconds, CPU seconds of the
    adding thread and of the process (merge threads too), `server_cpu`'s (a database server's CPU clock)
    and bytes written."""
    calls = []
    for start in range(0, n, commit):
        count = min(commit, n - start)
        rows = [NewItem("image", f"item{i}", item_hash(i, hashes)) for i in range(start, start + count)]
        vectors = unit_chunk(start, count, dim)
        served, before = server_cpu(), written_bytes()
        began, cpu, process = time.perf_counter(), time.thread_time(), time.process_time()
        index.add_vectors(rows, vectors)
        seconds, cpu, process = time.perf_counter() - began, time.thread_time() - cpu, time.process_time() - process
        written = written_bytes() - before
        calls.append({"items": count, "seconds": seconds, "cpu": cpu, "process_cpu": process, "server_cpu": server_cpu() - served, "bytes": written})
        if len(calls) % 10 == 0:
            log.info(f"added {start + count:,} of {n:,}")
    return calls


def rate(calls: list[dict[str, float]], first: bool, items: int, clock: str = "seconds") -> float:
    """Items per second (of wall time, or of the adding thread's CPU time: clock="cpu") over the first (or last) `items` items' calls."""
    chosen, total = [], 0
    for call in calls if first else reversed(calls):
        if total >= items:
            break
        chosen.append(call)
        total += call["items"]
    return total / sum(c[clock] for c in chosen)


def run(
    n: int | None = None,
    quick: bool = False,
    commit: int = 8192,
    dim: int = 512,
    queries: int = 1000,
    k: int = 10,
    pg_rows: int | None = None,
    directory: Path | None = None,
    hashes: str = "content",
) -> dict[str, Any]:
    if hashes not in HASHES:
        raise ValueError(f"hashes must be one of {', '.join(HASHES)}, not {hashes!r}")
    n = n or SIZES["quick" if quick else "full"]
    pg_rows = pg_rows if pg_rows is not None else (20_000 if quick else 100_000)
    window = 100_000 if n >= 1_000_000 else max(commit, n // 10)
    work = Path(tempfile.mkdtemp(prefix="seesay-storage-", dir=directory))
    result: dict[str, Any] = {
        "benchmark": NAME, "quick": quick, "machine": machine(), "n": n, "commit": commit, "dim": dim, "rate_window": window, "hashes": hashes,
    }
    try:
        with Index.create(work / "index", _artefact(dim)) as index:
            log.info(f"adding {n:,} vectors of dim {dim}, {commit:,} per commit, into {work / 'index'}")
            before = written_bytes()
            calls = add_all(index, n, commit, dim, hashes=hashes)
            began = time.perf_counter()
            index.wait_for_merges()  # the background merges still running after the last add
            drain_s = time.perf_counter() - began
            vector_bytes = n * dim * 4
            written = written_bytes() - before  # background merges' writes included (vectors are made in memory)
            on_disk = sum(p.stat().st_size for p in (work / "index").iterdir() if p.is_file())
            result["add"] = {
                "vector_bytes": vector_bytes,
                "bytes_written": written,
                "written_over_vectors": written / vector_bytes,
                "bytes_on_disk": on_disk,
                "seconds": sum(c["seconds"] for c in calls),
                "final_merges_s": drain_s,
                "first_rate_items_s": rate(calls, True, window),
                "last_rate_items_s": rate(calls, False, window),
                # The same per second of the adding thread's CPU time: the write path's own cost, which
                # neither other processes' load on a shared machine nor the background merges' thread inflate.
                "cpu_last_over_first": rate(calls, False, window, "cpu") / rate(calls, True, window, "cpu"),
                "per_commit_cpu": [round(c["cpu"], 4) for c in calls],
                "segments": index.info().segments["image"],
                "per_commit_seconds": [round(c["seconds"], 4) for c in calls],
                "per_commit_bytes": [c["bytes"] for c in calls],
            }
            add = result["add"]
            add["last_over_first"] = add["last_rate_items_s"] / add["first_rate_items_s"]
            log.info(
                f"written / vectors {add['written_over_vectors']:.2f}; add rate last/first {add['last_over_first']:.2f} "
                f"({add['last_rate_items_s']:,.0f} / {add['first_rate_items_s']:,.0f} items/s); per CPU second of the adding thread "
                f"{add['cpu_last_over_first']:.2f}; merges ran {drain_s:.1f} s past the last add"
            )
            if not queries:  # the comparison loads every vector (about 2n·dim·4 bytes at its peak): skippable
                result["search"] = {"skipped": "--queries 0"}
                index.close()
                return {**result, "postgresql": postgres_rates(pg_rows, commit, dim, hashes)}
            q = unit_chunk(-1 % 2**32, queries, dim)
            log.info(f"searching {queries:,} queries over {result['add']['segments']} segments")
            began = time.perf_counter()
            _, segmented = index.search("image", q, k)
            segmented_s = time.perf_counter() - began
            index.close()
        with Index.open(work / "index") as index:
            log.info("merging into one segment")
            began = time.perf_counter()
            index.compact(everything=True)
            compact_s = time.perf_counter() - began
            began = time.perf_counter()
            _, merged = index.search("image", q, k)
            merged_s = time.perf_counter() - began
        same = (segmented == merged).all(axis=1)
        result["search"] = {
            "queries": queries,
            "k": k,
            "identical_rows": int(same.sum()),
            "identical": bool(same.all()),
            "segmented_s": segmented_s,
            "merged_s": merged_s,
            "compact_s": compact_s,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["postgresql"] = postgres_rates(pg_rows, commit, dim, hashes)
    return result


def postgres_rates(rows: int, commit: int, dim: int, hashes: str = "content") -> dict[str, Any]:
    """Rows/s adding `rows` image rows (and vectors) in `commit`-row calls into a temporary PostgreSQL server:
    of wall time, and of CPU time (this process's and the server's processes' together), which is what the
    adds cost whatever else the machine runs."""
    from benchmarks.postgres import TemporaryServer, available

    reason = available()
    if reason or rows <= 0:
        return {"skipped": reason or "no rows asked for"}
    work = Path(tempfile.mkdtemp(prefix="seesay-storage-pg-"))
    found: dict[str, Any] = {"rows": rows}
    try:
        with TemporaryServer(durable=True) as server:
            # With `dim`-d vectors (the whole add), then with 4-d ones: the rows' own cost, segment files aside.
            for key, d in (("rows_per_s", dim), ("rows_only_per_s", 4)):
                with Index.create(work / key, _artefact(d), db_url=server.new_database()) as index:
                    log.info(f"adding {rows:,} rows into PostgreSQL, {d}-d vectors")
                    calls = add_all(index, rows, commit, d, server.cpu_seconds, hashes)
                found[key] = rows / sum(c["seconds"] for c in calls)
                cpu = sum(c["process_cpu"] + c["server_cpu"] for c in calls)
                found[key.replace("_per_s", "_per_cpu_s")] = rows / cpu if cpu > 0 else None
        return found
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plot(result: dict[str, Any], out_dir) -> None:
    fig, (rates, written) = figure(ncols=2, width=11)
    add = result["add"]
    sizes = np.array([result["commit"]] * len(add["per_commit_seconds"]), dtype=float)
    sizes[-1] = result["n"] - result["commit"] * (len(sizes) - 1)
    done = np.cumsum(sizes)
    rates.plot(done, sizes / np.array(add["per_commit_seconds"]), lw=1)
    rates.set_xlabel("items indexed")
    rates.set_ylabel("items/s of each commit")
    rates.set_title(f"add rate, last/first {result['rate_window']:,}: {add['last_over_first']:.2f}", fontsize=9)
    written.plot(done, np.cumsum(add["per_commit_bytes"]) / 2**30, label="bytes written")
    written.plot(done, done * result["dim"] * 4 / 2**30, ls="--", label="the vectors")
    written.plot(done, 3 * done * result["dim"] * 4 / 2**30, ls=":", label="3× the vectors")
    written.set_xlabel("items indexed")
    written.set_ylabel("GiB")
    written.set_title(f"written / vectors: {add['written_over_vectors']:.2f}", fontsize=9)
    written.legend(fontsize=7)
    save_plot(fig, out_dir, NAME)
