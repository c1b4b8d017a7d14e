"""`seesay bench query`: end-to-end text → image latency through the Python API, warm process.

One query = `QueryEngine.search_texts([text], "image", k)`: encode the text, search the
FAISS index, fetch the hits' rows (and each image's captions) from SQL.

The 100k-item index is built fast and without images: `Collection.create` with a real
encoder (so the saved encoder and manifest are the real ones), then ONE
`Index.add_vectors` call (the storage call every add makes) with synthetic rows, one
image row and one caption row per item, and random unit vectors of the encoder's
dimension. The transaction's own checks (row counts = vector counts) and generation
save run as for a real add. Queries are Flickr8k captions when
the data is there, else fixed phrases; the vectors are random (by default scattered
around 1,024 random centres, as in `bench index --data clustered`), so the hits are not
meaningful, but every cost on the query path is real.

Each factory (by default IVF1024,Flat, then Flat) gets its own index and timing; the
first is the headline `query_p50_ms`. Each also reports recall@k against exact search
over its own stored vectors, so a fast approximate index cannot hide a poor one.
"""
from __future__ import annotations

import csv
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from benchmarks.index_speed import recall_at, unit_vectors
from benchmarks.report import FLICKR, figure, machine, percentiles, save_plot
from indexer import Index, NewItem
from indexer.exact_search import ExactSearch
from retrieval.collection import Collection
from retrieval.encoders.base import Encoder
from retrieval.encoders.registry import load_encoder
from retrieval.engine import QueryEngine
from retrieval.errors import SeesayError

NAME = "query"
log = logging.getLogger(__name__)
DEFAULT_ENCODERS = ("default", "zeroshot")
FLICKR_CAPTIONS = FLICKR / "captions.csv"
WORDS = "a dog runs on the grass man in red shirt riding bike two children play near water girl jumps".split()
# The headline index first: IVF for interactive latency at 100k items (a flat scan of
# 100k × 1024 float32 vectors reads 400 MB per query), then exact search for comparison.
DEFAULT_FACTORIES = ("IVF1024,Flat", "Flat")
CENTRES = 1024


def pick_encoder(specs: Sequence[str]) -> Encoder:
    """The first encoder of `specs` that loads; SeesayError listing why each failed otherwise."""
    reasons = []
    for spec in specs:
        try:
            return load_encoder(spec)
        except Exception as exc:  # any failure to load: try the next, and say why
            reasons.append(f"{spec}: {exc}")
            log.info(f"encoder {spec} not available: {exc}")
    raise SeesayError("no encoder available for the query benchmark: " + "; ".join(reasons))


def query_texts(count: int, seed: int = 0) -> list[str]:
    """`count` caption-like queries: Flickr8k captions if present, else random word strings."""
    rng = np.random.default_rng(seed)
    if FLICKR_CAPTIONS.is_file():
        with open(FLICKR_CAPTIONS, newline="") as handle:
            captions = [row["caption"] for row in csv.DictReader(handle)]
        return [captions[i] for i in rng.choice(len(captions), size=count, replace=False)]
    return [" ".join(rng.choice(WORDS, size=8)) for _ in range(count)]


def build_synthetic(
    directory: Path, encoder: Encoder, n: int, factory: str = "Flat", seed: int = 0, data: str = "clustered"
) -> Index:
    """An index of n synthetic images with one caption each and random vectors (see module doc)."""
    rng = np.random.default_rng(seed)
    centres = _centres(encoder.dim, data, seed)
    index = Collection.create(directory, encoder, factory).index
    images = [
        NewItem("image", f"synthetic-{i:06d}", f"img{i:061d}", path=f"synthetic/{i:06d}.jpg", split="bench")
        for i in range(n)
    ]
    captions = [
        NewItem(
            "caption", f"synthetic-{i:06d}", f"cap{i:061d}", split="bench", image_hash=f"img{i:061d}",
            text=" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8)),
        )
        for i in range(n)
    ]
    vectors = np.concatenate([unit_vectors(n, encoder.dim, rng, data, centres) for _ in range(2)])
    index.add_vectors(images + captions, vectors)
    return index


def _centres(dim: int, data: str, seed: int) -> np.ndarray | None:
    """The cluster centres of the synthetic vectors (None for uniform data): the same for a given seed."""
    return unit_vectors(CENTRES, dim, np.random.default_rng(seed + 2)) if data == "clustered" else None


def time_factory(
    root: Path, encoder: Encoder, n: int, factory: str, texts: Sequence[str], warm: Sequence[str],
    k: int, seed: int, data: str,
) -> dict[str, Any]:
    """Build one synthetic index, then time single text queries end to end and by stage."""
    log.info(f"building a synthetic {n:,}-image {factory} index with encoder {encoder.spec} (dim {encoder.dim})")
    start = time.perf_counter()
    build_synthetic(root, encoder, n, factory, seed, data).close()
    build_s = time.perf_counter() - start
    collection = Collection.open(root, read_only=True)
    index = collection.index
    try:
        engine = QueryEngine(index, collection.encoder)
        engine.search_texts(list(warm), "image", k)  # load the vectors, warm the encoder
        for text in warm:
            engine.search_texts([text], "image", k)
        log.info(f"timing {len(texts)} queries end to end and by stage")
        count = len(texts)
        total, encode, search, fetch = (np.empty(count) for _ in range(4))
        for i, text in enumerate(texts):
            t0 = time.perf_counter()
            engine.search_texts([text], "image", k)
            t1 = time.perf_counter()
            vector = collection.encoder.encode_text_queries([text], cross_modal=True)  # as the engine encodes a query
            t2 = time.perf_counter()
            _, ids = index.search("image", vector, k)
            t3 = time.perf_counter()
            hits = [int(j) for j in ids[0] if j >= 0]
            index.items_and_captions(hits)  # as the engine reads its hits
            t4 = time.perf_counter()
            total[i], encode[i], search[i], fetch[i] = (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3
        recall = _recall_against_exact(index, k, seed, data)
    finally:
        index.close()
    e2e = percentiles(total)
    return {
        "factory": factory,
        "build_s": build_s,
        "query_p50_ms": e2e["p50_ms"],
        "query_p99_ms": e2e["p99_ms"],
        "end_to_end": e2e,
        "stages": {"encode_text": percentiles(encode), "search": percentiles(search), "fetch_sql": percentiles(fetch)},
        "recall_at_k": recall,
        "latencies_ms": [round(float(v), 3) for v in total],
    }


def _recall_against_exact(index: Index, k: int, seed: int, data: str, count: int = 200) -> float:
    """Recall@k of the index's image search against exact search over its own stored vectors.

    The queries come from the stored vectors' distribution (fresh draws around the same
    centres): text vectors of real captions bear no relation to synthetic vectors, so
    their exact neighbours would be near-ties and say nothing about the index.
    """
    ids, vectors = index.all_vectors("image")
    dim = vectors.shape[1]
    queries = unit_vectors(count, dim, np.random.default_rng(seed + 1), data, _centres(dim, data, seed))
    _, found = index.search("image", queries, k)
    _, truth = ExactSearch(vectors, ids).search(queries, k, "faiss")
    return recall_at(found, truth, k)


def run(
    n: int | None = None,
    quick: bool = False,
    encoders: Sequence[str] = DEFAULT_ENCODERS,
    queries: int | None = None,
    k: int = 10,
    factories: Sequence[str] = DEFAULT_FACTORIES,
    data: str = "clustered",
    workdir: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time text → image queries on a synthetic index of each factory; the first is the headline."""
    n = n or (10_000 if quick else 100_000)
    count = queries or (50 if quick else 300)
    encoder = pick_encoder(encoders)
    texts = query_texts(count + 10, seed)
    warm, texts = texts[:10], texts[10:]
    root = Path(tempfile.mkdtemp(prefix="bench-query-", dir=workdir))
    try:
        by_factory = {
            factory: time_factory(root / f"index-{i}", encoder, n, factory, texts, warm, k, seed, data)
            for i, factory in enumerate(factories)
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    head = by_factory[factories[0]]
    return {
        "benchmark": NAME,
        "n_items": n,
        "n_images": n,
        "n_captions": n,
        "data": data,
        "encoder": encoder.spec,
        "dim": encoder.dim,
        "k": k,
        "quick": quick,
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        **{key: head[key] for key in ("factory", "build_s", "query_p50_ms", "query_p99_ms", "end_to_end", "stages",
                                      "recall_at_k", "latencies_ms")},
        "factories": by_factory,
    }


def plot(result: dict[str, Any], out_dir) -> None:
    fig, ax = figure()
    runs = result["factories"]
    top = max(np.percentile(r["latencies_ms"], 99.5) for r in runs.values()) * 1.1
    bins = np.linspace(0, top, 50)
    for factory, r in runs.items():
        stages = r["stages"]
        ax.hist(r["latencies_ms"], bins=bins, alpha=0.6, label=(
            f"{factory}: p50 {r['query_p50_ms']:.1f} ms, p99 {r['query_p99_ms']:.1f} ms, recall@{result['k']} "
            f"{r['recall_at_k']:.3f} (median stages: encode {stages['encode_text']['p50_ms']:.1f}, search "
            f"{stages['search']['p50_ms']:.1f}, SQL {stages['fetch_sql']['p50_ms']:.1f} ms)"))
    ax.set_title(f"text→image query end to end, {result['n_items']:,} images, {result['encoder']} (dim {result['dim']})",
                 fontsize=9)
    ax.set_xlabel("latency per query (ms)")
    ax.set_ylabel("queries (count)")
    ax.legend(fontsize=7)
    save_plot(fig, out_dir, NAME)
