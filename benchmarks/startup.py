"""`seesay bench startup`: what one `seesay search --index DIR "text"` costs, as a user at a shell pays it.

Each run is a fresh process (`python -m cli.app search ...`, what the `seesay` script runs),
so every figure includes starting Python, importing seesay and its libraries, opening the
index, loading what the query needs and answering. Each run's wall time and its CPU time
(user + sys, from the operating system's accounting of the finished child) are recorded:
on a loaded machine the wall time waits for other processes, while the CPU time stays near
what a quiet machine's wall time would be (the start-up path is single-threaded but for BLAS
threads). The load average before and after is printed beside the figures; the target is
≤ 3 s wall on a quiet 2-core machine.

Also timed: the import of the CLI alone, and a file of queries answered in one process
(`--queries`), so the fixed cost can be told from the cost per query. The first search is a
warm-up, reported apart: it may fill a once-per-model cache (the towers' text heads).

    python -m benchmarks.startup [--index DIR] [--encoder default] [--runs 5] [--queries 1000] [--json]

Without --index, a small index of generated shapes is built with --encoder in a
temporary folder first (not timed).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.report import figure, machine, save_plot

NAME = "startup"
log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
QUERY = "a dog runs through the snow"


def _seesay(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "cli.app", *map(str, args)]


def timed(command: Sequence[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user + sys) of one run of `command`; a failure is an error naming its stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def build_index(directory: Path, encoder: str) -> Path:
    """A 24-image index of generated shapes made with `encoder`."""
    from retrieval.demo_data import make_shape_set

    data = make_shape_set(directory / "data", copies=2)
    index = directory / "index"
    subprocess.run(_seesay(["index", "--encoder", encoder, "--data", data, "--index", index, "--json"]),
                   check=True, capture_output=True, cwd=ROOT)
    return index


def _summary(runs: list[tuple[float, float]]) -> dict[str, Any]:
    return {"wall_s": round(statistics.median(w for w, _ in runs), 3), "cpu_s": round(statistics.median(c for _, c in runs), 3),
            "runs_wall_s": [round(w, 3) for w, _ in runs], "runs_cpu_s": [round(c, 3) for _, c in runs]}


def measure(index: Path, runs: int, n_queries: int) -> dict[str, Any]:
    """Warm-up, then median wall and CPU times of a one-query search and of the bare import, and a file of queries."""
    search = _seesay(["search", "--index", index, QUERY, "-k", "10", "--json"])
    log.info("warm-up search")
    warm = timed(search)
    log.info(f"{runs} searches, {runs} bare imports")
    result: dict[str, Any] = {
        "first_search": {"wall_s": round(warm[0], 3), "cpu_s": round(warm[1], 3)},
        "search": _summary([timed(search) for _ in range(runs)]),
        "import_cli": _summary([timed([sys.executable, "-c", "import cli.app"]) for _ in range(runs)]),
    }
    if n_queries:
        log.info(f"a file of {n_queries} queries")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
            handle.write("\n".join(f"{QUERY} number {i}" for i in range(n_queries)))
        try:
            wall, cpu = timed(_seesay(["search", "--index", index, "--queries", handle.name, "-k", "10", "--json"]))
        finally:
            os.unlink(handle.name)
        result["queries_file"] = {"queries": n_queries, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                                  "per_extra_query_cpu_ms": round(1000 * (cpu - result["search"]["cpu_s"]) / max(n_queries - 1, 1), 2)}
    return result


def run(index: Path | None = None, encoder: str = "default", runs: int = 5, n_queries: int = 1000) -> dict[str, Any]:
    """Measure start-up on `index` (default: a small index built with `encoder` first)."""
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as scratch:
        if index is None:
            log.info(f"building a small index with {encoder}")
        target = index or build_index(Path(scratch), encoder)
        result = {"benchmark": NAME, "index": str(index or f"(generated, encoder {encoder})"),
                  **measure(target, runs, n_queries)}
    result["load_average_before"] = load_before
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result["machine"] = machine()
    return result


def plot(result: dict[str, Any], out_dir) -> None:
    """Wall and CPU seconds of each timed run: a bare import and a one-query search."""
    fig, ax = figure()
    for i, key in enumerate(("import_cli", "search")):
        r = result[key]
        ax.scatter([i - 0.1] * len(r["runs_wall_s"]), r["runs_wall_s"], label="wall" if i == 0 else None, color="C0")
        ax.scatter([i + 0.1] * len(r["runs_cpu_s"]), r["runs_cpu_s"], label="CPU (user + sys)" if i == 0 else None, color="C1")
    ax.axhline(3.0, ls=":", color="grey", label="target: 3 s wall, quiet machine")
    ax.set_xticks([0, 1], ["import cli.app", "search \"text\""])
    ax.set_ylabel("seconds per fresh process")
    ax.set_title(f"start-up, load average {result['load_average_before'][0]} → {result['load_average_after'][0]} "
                 f"on {result['cores']} cores", fontsize=9)
    ax.legend(fontsize=7)
    save_plot(fig, out_dir, NAME)


def describe(result: dict[str, Any]) -> list[str]:
    """The figures as lines of text."""
    s, imp = result["search"], result["import_cli"]
    lines = [f"seesay search --index DIR \"text\": {s['wall_s']:.2f} s wall, {s['cpu_s']:.2f} s CPU (user + sys), "
             f"median of {len(s['runs_wall_s'])} (first search {result['first_search']['wall_s']:.2f} s wall, "
             f"{result['first_search']['cpu_s']:.2f} s CPU)",
             f"import cli.app alone: {imp['wall_s']:.2f} s wall, {imp['cpu_s']:.2f} s CPU"]
    if "queries_file" in result:
        q = result["queries_file"]
        lines.append(f"--queries with {q['queries']} queries: {q['wall_s']:.2f} s wall, {q['cpu_s']:.2f} s CPU in one process "
                     f"({q['per_extra_query_cpu_ms']:.1f} ms CPU per extra query)")
    lines.append(f"load average {result['load_average_before']} before, {result['load_average_after']} after, on "
                 f"{result['cores']} cores: on a busy machine wall times are upper bounds; CPU time ≈ a quiet machine's wall")
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, help="An existing index (default: build a small one)")
    parser.add_argument("--encoder", default="default", help="Encoder for the built index (default: default)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--queries", type=int, default=1000, help="Size of the query file answered in one process (0: skip)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.index, args.encoder, args.runs, args.queries)
    print(json.dumps(result, indent=2) if args.json else "\n".join(describe(result)))
    return result


if __name__ == "__main__":
    main()
