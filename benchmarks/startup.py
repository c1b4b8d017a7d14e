"""Start-up: the wall time of one `seesay search --index DIR "text"`, as a user at a shell pays it.

Each run is a fresh process (`python -m cli.app search ...`, what the `seesay` script runs),
so every figure includes starting Python, importing seesay and its libraries, opening the
index, loading the encoder and answering. Also timed: the import of the CLI alone, and a
file of queries answered in one process (`--queries`), so the fixed cost can be told from
the cost per query. The machine's load average is printed beside the figures: on a busy
machine they are upper bounds (the target is ≤ 3 s on a quiet 2-core machine).

    python -m benchmarks.startup [--index DIR] [--encoder default] [--runs 5] [--queries 1000] [--json]

Without --index, a small index of generated shapes is built with --encoder in a
temporary folder first (not timed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
QUERY = "a dog runs through the snow"


def _seesay(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "cli.app", *map(str, args)]


def timed(command: Sequence[str]) -> float:
    """Wall seconds of one run of `command`; a failure is an error naming its stderr."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds


def build_index(directory: Path, encoder: str) -> Path:
    """A 24-image index of generated shapes made with `encoder`."""
    from retrieval.demo_data import make_shape_set

    data = make_shape_set(directory / "data", copies=2)
    index = directory / "index"
    subprocess.run(_seesay(["index", "--encoder", encoder, "--data", data, "--index", index, "--json"]),
                   check=True, capture_output=True, cwd=ROOT)
    return index


def measure(index: Path, runs: int, n_queries: int) -> dict:
    """Median and all wall times of a one-query search, the bare import, and a file of queries."""
    search = [timed(_seesay(["search", "--index", index, QUERY, "-k", "10", "--json"])) for _ in range(runs)]
    imports = [timed([sys.executable, "-c", "import cli.app"]) for _ in range(runs)]
    result = {
        "search_s": round(statistics.median(search), 3),
        "search_runs_s": [round(s, 3) for s in search],
        "import_cli_s": round(statistics.median(imports), 3),
    }
    if n_queries:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
            handle.write("\n".join(f"{QUERY} number {i}" for i in range(n_queries)))
        try:
            many = timed(_seesay(["search", "--index", index, "--queries", handle.name, "-k", "10", "--json"]))
        finally:
            os.unlink(handle.name)
        result.update({"queries": n_queries, "queries_file_s": round(many, 3),
                       "per_extra_query_ms": round(1000 * (many - result["search_s"]) / max(n_queries - 1, 1), 2)})
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, help="An existing index (default: build a small one)")
    parser.add_argument("--encoder", default="default", help="Encoder for the built index (default: default)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--queries", type=int, default=1000, help="Size of the query file answered in one process (0: skip)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        index = args.index or build_index(Path(scratch), args.encoder)
        result = {"index": str(args.index or f"(generated, encoder {args.encoder})"), **measure(index, args.runs, args.queries)}
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    result["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"seesay search --index DIR \"text\": {result['search_s']:.2f} s median of {args.runs} "
              f"(runs {', '.join(f'{s:.2f}' for s in result['search_runs_s'])}); import cli.app alone {result['import_cli_s']:.2f} s")
        if args.queries:
            print(f"--queries with {args.queries} queries: {result['queries_file_s']:.2f} s in one process "
                  f"({result['per_extra_query_ms']:.1f} ms per extra query)")
        print(f"load average {result['load_average']} on {result['cores']} cores (quiet machine: all well under 1)")
    return result


if __name__ == "__main__":
    main()
