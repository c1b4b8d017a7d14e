"""`python -m benchmarks.ondisk`: an IVF index served from memory maps against the same index in RAM.

1. Build a seesay index of N clustered unit vectors (512-d; 2,000 Gaussian clusters) with an
   IVF factory (default IVF1024,SQ8): the first commit (65,536 vectors) trains it once, later
   commits of 8,192 are added into the trained index, the policy's merges concatenate their
   inverted lists, and `compact` leaves one segment whose FAISS part holds all N.
   Before that compaction, `faiss.contrib.ondisk.merge_ondisk` also merges the segments' parts
   into one index whose lists are an `OnDiskInvertedLists` file (FAISS's own on-disk layout).
2. Three fresh processes answer the same queries (nprobe 16, k 10), each importing the same
   modules first: "in RAM" reads the compacted part with `faiss.read_index` (lists copied into
   the process, as FAISS loads an index by default); "memory-mapped" opens the seesay index
   read-only, which serves every part through `IO_FLAG_MMAP_IFC` (the OS pages lists in as
   they are searched); "ondisk" reads the merge_ondisk index (its lists file mapped). Each reports /proc/self/status VmRSS, RssAnon (memory only the process
   holds) and RssFile (file pages mapped in: page cache, which the kernel may drop and read
   again) after the imports, after loading and after the queries.
3. recall@10 of each against exact search on the first `truth` queries (they search the same
   codes, so it is equal by construction; the script checks the ids are identical).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from benchmarks.report import machine
from benchmarks.storage import _artefact
from indexer import Index, NewItem

NAME = "ondisk"
log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
CLUSTERS = 2_000

_PROBE = r"""
import json, sys, time
import numpy as np
import faiss
from indexer import Index
from benchmarks.ondisk import stdout_to_stderr

def rss():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

mode, where, queries_path, ids_path, nprobe = sys.argv[1:6]
report = {"imported": rss()}
queries = np.load(queries_path)
began = time.perf_counter()
if mode == "ram":
    index = faiss.read_index(where)
    faiss.extract_index_ivf(index).nprobe = int(nprobe)
    search = lambda q: index.search(q, 10)[1]
elif mode == "ondisk":
    with stdout_to_stderr():  # FAISS prints where it found the .ivfdata file
        index = faiss.read_index(where, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    faiss.extract_index_ivf(index).nprobe = int(nprobe)
    search = lambda q: index.search(q, 10)[1]
else:
    index = Index.open(where, read_only=True).load()
    index.set_search_params(nprobe=int(nprobe))
    search = lambda q: index.search("image", q, 10)[1]
report["load_s"] = time.perf_counter() - began
report["loaded"] = rss()
began = time.perf_counter()
ids = search(queries)
report["search_s"] = time.perf_counter() - began
report["searched"] = rss()
np.save(ids_path, ids)
print(json.dumps(report))
"""


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what C/C++ code writes to file descriptor 1 to stderr meanwhile: FAISS 1.15 prints a line
    to stdout when it builds or reads `OnDiskInvertedLists`, which would break a JSON report there.
    Both sides' buffers are flushed first and last, so nothing crosses over later."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def build_ondisk(parts: list[Path], folder: Path) -> Path:
    """`faiss.contrib.ondisk.merge_ondisk` of the IVF `parts` into one index whose inverted lists are an
    `OnDiskInvertedLists` file beside it (folder/merged.ivfdata): FAISS's own on-disk layout, for comparison."""
    template = faiss.read_index(str(parts[0]))
    template.reset()
    folder.mkdir()
    target = folder / "merged.faiss"
    with stdout_to_stderr():
        merge_ondisk(template, [str(p) for p in parts], str(folder / "merged.ivfdata"))
        faiss.write_index(template, str(target))
    return target


def clustered(seed: int, n: int, dim: int) -> np.ndarray:
    """n unit vectors near CLUSTERS fixed centres (the centres depend on dim only)."""
    centres = np.random.default_rng(12345).standard_normal((CLUSTERS, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, CLUSTERS, n)] + rng.standard_normal((n, dim), dtype=np.float32) * np.float32(1 / np.sqrt(dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def chunks(n: int, first: int, commit: int) -> list[tuple[int, int]]:
    """(start, count) of each commit: `first` vectors, then `commit` at a time."""
    spans, start = [(0, min(first, n))], min(first, n)
    while start < n:
        spans.append((start, min(commit, n - start)))
        start += commit
    return spans


def exact_top(queries: np.ndarray, spans: list[tuple[int, int]], dim: int, k: int) -> np.ndarray:
    """Exact inner-product top-k ids (ids are 1 + the vector's position), chunk by chunk."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for start, count in spans:
        scores = queries @ clustered(start, count, dim).T
        s = np.concatenate([best_s, scores], axis=1)
        i = np.concatenate([best_i, np.arange(start + 1, start + count + 1)[None, :].repeat(len(queries), 0)], axis=1)
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    return best_i


def probe(mode: str, where: Path, queries: Path, ids: Path, nprobe: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, str(where), str(queries), str(ids), str(nprobe)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    if done.returncode:
        raise RuntimeError(f"the {mode} process failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def run(
    n: int = 1_000_000,
    dim: int = 512,
    factory: str = "IVF1024,SQ8",
    first: int = 65_536,
    commit: int = 8192,
    queries: int = 1000,
    truth: int = 200,
    nprobe: int = 16,
    directory: Path | None = None,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="seesay-ondisk-", dir=directory))
    result: dict[str, Any] = {"benchmark": NAME, "machine": machine(), "n": n, "dim": dim, "factory": factory, "nprobe": nprobe, "queries": queries}
    spans = chunks(n, first, commit)
    try:
        began = time.perf_counter()
        with Index.create(work / "index", _artefact(dim), factory=factory) as index:
            for number, (start, count) in enumerate(spans):
                rows = [NewItem("image", f"item{i}", f"{i:016x}") for i in range(start, start + count)]
                index.add_vectors(rows, clustered(start, count, dim))
                if number % 10 == 0:
                    log.info(f"added {start + count:,} of {n:,}")
            index.wait_for_merges()
            result["build_s"] = time.perf_counter() - began
            began = time.perf_counter()
            parts = sorted(work / "index" / name for name in index.info().files if name.endswith(".faiss"))
            ondisk = build_ondisk(parts, work / "ondisk")
            result["merge_ondisk_s"] = time.perf_counter() - began
            result["merge_ondisk_parts"] = len(parts)
            began = time.perf_counter()
            index.compact(everything=True)
            result["compact_s"] = time.perf_counter() - began
            files = index.info().files
        part = next(work / "index" / name for name in files if name.endswith(".faiss"))
        result["part_bytes"] = part.stat().st_size
        q = clustered(-7 % 2**32, queries, dim)
        np.save(work / "queries.npy", q)
        log.info(f"in RAM and memory-mapped: {queries} queries each in a fresh process")
        result["ram"] = probe("ram", part, work / "queries.npy", work / "ram.npy", nprobe)
        result["mmap"] = probe("mmap", work / "index", work / "queries.npy", work / "mmap.npy", nprobe)
        result["ondisk"] = probe("ondisk", ondisk, work / "queries.npy", work / "ondisk.npy", nprobe)
        ram_ids, mmap_ids, ondisk_ids = (np.load(work / f"{mode}.npy") for mode in ("ram", "mmap", "ondisk"))
        log.info(f"exact top-10 of {truth} queries")
        exact = exact_top(q[:truth], spans, dim, 10)
        found = {"ram": ram_ids, "mmap": mmap_ids, "ondisk": ondisk_ids}
        result["recall_at_10"] = {mode: recall(ids[:truth], exact) for mode, ids in found.items()}
        result["identical_ids"] = bool((ram_ids == mmap_ids).all())
        result["ondisk_identical_ids"] = bool((ram_ids == ondisk_ids).all())
        for key in ("VmRSS", "RssAnon"):
            grown = {mode: result[mode]["searched"][key] - result[mode]["imported"][key] for mode in found}
            for mode in ("mmap", "ondisk"):
                result[f"{key}_{mode}_over_ram"] = result[mode]["searched"][key] / result["ram"]["searched"][key]
                result[f"{key}_growth_{mode}_over_ram"] = grown[mode] / grown["ram"]  # the index's own memory, past the imports
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--factory", default="IVF1024,SQ8")
    parser.add_argument("--first", type=int, default=65_536, help="vectors of the first commit, which trains the index")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--truth", type=int, default=200)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress, on stderr
    result = run(n=args.n, factory=args.factory, first=args.first, queries=args.queries, truth=args.truth, nprobe=args.nprobe, directory=args.dir)
    mib = 2**20
    print(f"{result['n']:,} × {result['dim']} in {result['factory']}, nprobe {result['nprobe']}, {result['queries']} queries; "
          f"part file {result['part_bytes'] / mib:,.0f} MiB")
    print(f"{'':12} {'VmRSS':>9} {'RssAnon':>9} {'RssFile':>9}  (MiB: after imports / load / queries)")
    for mode in ("ram", "mmap", "ondisk"):
        for stage in ("imported", "loaded", "searched"):
            r = result[mode][stage]
            print(f"{mode + ' ' + stage:12} {r['VmRSS'] / mib:9,.0f} {r['RssAnon'] / mib:9,.0f} {r['RssFile'] / mib:9,.0f}")
    recall10 = result["recall_at_10"]
    print(f"recall@10 (first {args.truth} queries): in RAM {recall10['ram']:.3f}, memory-mapped {recall10['mmap']:.3f}, "
          f"OnDiskInvertedLists {recall10['ondisk']:.3f}; identical ids: mapped {result['identical_ids']}, "
          f"on disk {result['ondisk_identical_ids']}")
    for mode, name in (("mmap", "memory-mapped"), ("ondisk", "OnDiskInvertedLists")):
        for label, key in (("after the queries", f"{mode}_over_ram"), ("growth past the imports", f"growth_{mode}_over_ram")):
            print(f"{name} / in RAM, {label}: VmRSS {result['VmRSS_' + key]:.2f}, RssAnon {result['RssAnon_' + key]:.2f}")
    print(f"build {result['build_s']:.0f} s, merge_ondisk of {result['merge_ondisk_parts']} parts {result['merge_ondisk_s']:.1f} s, "
          f"compact {result['compact_s']:.0f} s; search {result['ram']['search_s']:.1f} s in RAM, {result['mmap']['search_s']:.1f} s mapped, "
          f"{result['ondisk']['search_s']:.1f} s OnDiskInvertedLists")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
