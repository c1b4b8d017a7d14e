"""`python -m benchmarks.query_encode`: one text query's encoding, as shipped and against what it replaced.

Three ways to encode a single caption with a `towers` model, timed in one process and
alternating query by query (so a change in the machine's speed hits all of them alike):
transformers' float32 layers (the stored-caption path), the same layers with oneDNN-packed
linears in `runtime.cpu_query_dtype()`, and the query path as shipped (`encode_text_queries`:
fused layers, that precision, `runtime.query_threads()`). Prints the p50 and minimum of each,
the shipped path's lowest cosine to the float32 rows, and the threads it chose.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections import Counter
from typing import Any, Callable

import numpy as np

from benchmarks.query import query_texts
from retrieval import runtime
from retrieval.backbones import query_layers
from retrieval.encoders.registry import load_encoder
from retrieval.encoders.towers import TowersEncoder


def packed_only(encoder) -> Callable[[str], np.ndarray]:
    """Encode one caption through a copy whose linears are packed but whose layers are transformers' own."""
    shared = {id(m): m for m in (encoder.heads.image_top, encoder.heads.image_head) if m is not None}
    heads = copy.deepcopy(encoder.heads, memo=shared)
    st = copy.deepcopy(encoder.st)
    for part in (st, heads.text_head, heads.text_top):
        if part is not None:
            query_layers.for_queries(part, runtime.cpu_query_dtype())
    return lambda text: encoder._text_rows([text], 1, st, heads)


def run(spec: str = "default", queries: int = 100, seed: int = 0) -> dict[str, Any]:
    """p50 / min milliseconds of each way, over `queries` Flickr8k captions (or made-up ones)."""
    encoder = load_encoder(spec)
    if not isinstance(encoder, TowersEncoder):
        raise SystemExit(f"{spec}: a towers model is needed (its text side is what this compares), not {encoder.kind}")
    texts = query_texts(queries + 5, seed)
    ways = {
        "float32, transformers' layers": lambda text: encoder._text_rows([text], 1, encoder.st, encoder.heads),
        "packed linears": packed_only(encoder),
        "shipped query path": lambda text: encoder.encode_text_queries([text], cross_modal=True),
    }
    reference = encoder._text_rows(texts, 64, encoder.st, encoder.heads)
    shipped = np.concatenate([ways["shipped query path"](t)[:, : reference.shape[1]] for t in texts])
    times: dict[str, list[float]] = {name: [] for name in ways}
    threads = Counter()
    for i, text in enumerate(texts):
        threads[runtime.query_threads()] += 1
        for name, encode in ways.items():
            start = time.perf_counter()
            encode(text)
            if i >= 5:  # the first few warm each way up
                times[name].append((time.perf_counter() - start) * 1e3)
    return {
        "encoder": encoder.spec,
        "precision": str(runtime.cpu_query_dtype()).removeprefix("torch."),
        "queries": queries,
        "ms": {name: {"p50": statistics.median(t), "min": min(t)} for name, t in times.items()},
        "shipped_min_cosine": float((shipped * reference).sum(axis=1).min()),
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
    print(f"  shipped path: lowest cosine to the float32 rows {result['shipped_min_cosine']:.6f}")


if __name__ == "__main__":
    main()
