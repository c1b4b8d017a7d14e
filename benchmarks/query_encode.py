"""`python -m benchmarks.query_encode`: one text query's encoding, as a query and as a stored caption.

Two ways to encode a single caption, timed in one process and alternating query by query
(so a change in the machine's speed hits both alike): `encode_texts` (what a stored caption
runs: the float32 model, as transformers runs it, plus the caption's bias against the query
bank) and `encode_text_queries` (what a search runs: for a `towers` model on the CPU, fused
layers in `runtime.cpu_query_dtype()` and `runtime.query_threads()` threads). Prints the p50
and minimum of each, the lowest cosine between the two paths' rows, and the threads chosen.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from typing import Any

import numpy as np

from benchmarks.query import query_texts
from retrieval import runtime
from retrieval.encoders.registry import load_encoder

WARM_UP = 5


def run(spec: str = "default", queries: int = 100, seed: int = 0) -> dict[str, Any]:
    """p50 / min milliseconds of each way over `queries` Flickr8k captions (or made-up ones), and how close their rows are."""
    encoder = load_encoder(spec)
    texts = query_texts(queries + WARM_UP, seed)
    ways = {
        "stored caption (encode_texts)": lambda text: encoder.encode_texts([text]),
        "query (encode_text_queries)": lambda text: encoder.encode_text_queries([text], cross_modal=True),
    }
    stored = encoder.as_queries(encoder.encode_texts(texts), cross_modal=True)
    searched = encoder.encode_text_queries(texts, cross_modal=True)
    plain = slice(0, -1) if getattr(encoder, "querybank", None) is not None else slice(None)  # leave the bias mark out
    cosine = (stored[:, plain] * searched[:, plain]).sum(axis=1) / (
        np.linalg.norm(stored[:, plain], axis=1) * np.linalg.norm(searched[:, plain], axis=1))
    times: dict[str, list[float]] = {name: [] for name in ways}
    threads: Counter = Counter()
    for i, text in enumerate(texts):
        threads[runtime.query_threads()] += 1
        for name, encode in ways.items():
            start = time.perf_counter()
            encode(text)
            if i >= WARM_UP:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {
        "encoder": encoder.spec,
        "precision": str(runtime.cpu_query_dtype()).removeprefix("torch."),
        "queries": queries,
        "ms": {name: {"p50": statistics.median(t), "min": min(t)} for name, t in times.items()},
        "min_cosine": float(cosine.min()),
        "threads_chosen": dict(threads),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="default")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.encoder, args.queries)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['encoder']}, {result['precision']}, {result['queries']} queries, threads chosen {result['threads_chosen']}")
    for name, ms in result["ms"].items():
        print(f"  {name:32s} p50 {ms['p50']:6.1f} ms   min {ms['min']:6.1f}")
    print(f"  lowest cosine between the two paths' rows {result['min_cosine']:.6f}")


if __name__ == "__main__":
    main()
