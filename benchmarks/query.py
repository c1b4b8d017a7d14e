"""`seesay bench query`: end-to-end text → image latency through the Python API, warm process.

One query = `QueryEngine.search_texts([text], "image", k)`: encode the text, search the
FAISS index, fetch the hits' rows (and each image's captions) from SQL.

The 100k-item index is built fast and without images: `Index.create` with a real
encoder (so the saved encoder and manifest are the real ones), then ONE write
transaction of the index itself (`Index._writing`, the context every add/delete runs
in) into which synthetic rows are bulk-inserted with explicit ids, one image row and
one caption row per item (`indexer.store.ItemRow`), and random unit vectors of the
encoder's dimension are added under those ids to the image and caption vector sets
(`indexer.vectors.VectorSet.add`). The transaction's own checks (row counts = vector
counts) and generation save run as for a real add. Queries are Flickr8k captions when
the data is there, else fixed phrases; the vectors are random, so the hits are not
meaningful, but every cost on the query path is real.
"""
from __future__ import annotations

import csv
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np
from sqlalchemy import insert

from benchmarks.index_speed import unit_vectors
from benchmarks.report import FLICKR, figure, latencies_ms, machine, percentiles, save_plot
from indexer import Index
from indexer.exact_search import ExactSearch
from indexer.store import ItemRow
from retrieval.encoders.base import Encoder
from retrieval.encoders.registry import load_encoder
from retrieval.engine import QueryEngine
from retrieval.errors import SeesayError

NAME = "query"
DEFAULT_ENCODERS = ("default", "zeroshot")
FLICKR_CAPTIONS = FLICKR / "captions.csv"
WORDS = "a dog runs on the grass man in red shirt riding bike two children play near water girl jumps".split()
INSERT_CHUNK = 20_000


def pick_encoder(specs: Sequence[str], log: Callable[[str], None]) -> Encoder:
    """The first encoder of `specs` that loads; SeesayError listing why each failed otherwise."""
    reasons = []
    for spec in specs:
        try:
            return load_encoder(spec)
        except Exception as exc:  # any failure to load: try the next, and say why
            reasons.append(f"{spec}: {exc}")
            log(f"encoder {spec} not available: {exc}")
    raise SeesayError("no encoder available for the query benchmark: " + "; ".join(reasons))


def query_texts(count: int, seed: int = 0) -> list[str]:
    """`count` caption-like queries: Flickr8k captions if present, else random word strings."""
    rng = np.random.default_rng(seed)
    if FLICKR_CAPTIONS.is_file():
        with open(FLICKR_CAPTIONS, newline="") as handle:
            captions = [row["caption"] for row in csv.DictReader(handle)]
        return [captions[i] for i in rng.choice(len(captions), size=count, replace=False)]
    return [" ".join(rng.choice(WORDS, size=8)) for _ in range(count)]


def build_synthetic(directory: Path, encoder: Encoder, n: int, factory: str = "Flat", seed: int = 0) -> Index:
    """An index of n synthetic images with one caption each and random vectors (see module doc)."""
    rng = np.random.default_rng(seed)
    index = Index.create(directory, encoder, factory)
    image_ids = np.arange(1, n + 1, dtype=np.int64)
    caption_ids = image_ids + n
    with index._writing("add synthetic items") as (session, sets):
        for start in range(0, n, INSERT_CHUNK):
            chunk = range(start, min(start + INSERT_CHUNK, n))
            session.execute(insert(ItemRow), [
                {"id": int(image_ids[i]), "kind": "image", "source_id": f"synthetic-{i:06d}",
                 "path": f"synthetic/{i:06d}.jpg", "split": "bench", "hash": f"img{i:061d}"}
                for i in chunk
            ])
            session.execute(insert(ItemRow), [
                {"id": int(caption_ids[i]), "kind": "caption", "source_id": f"synthetic-{i:06d}",
                 "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(8)),
                 "image_item_id": int(image_ids[i]), "split": "bench", "hash": f"cap{i:061d}"}
                for i in chunk
            ])
        sets["image"].add(unit_vectors(n, encoder.dim, rng), image_ids)
        sets["caption"].add(unit_vectors(n, encoder.dim, rng), caption_ids)
    return index


def run(
    n: int | None = None,
    quick: bool = False,
    encoders: Sequence[str] = DEFAULT_ENCODERS,
    queries: int | None = None,
    k: int = 10,
    factory: str = "Flat",
    workdir: Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Build the synthetic index, then time single text queries end to end and by stage."""
    n = n or (10_000 if quick else 100_000)
    count = queries or (50 if quick else 300)
    encoder = pick_encoder(encoders, log)
    texts = query_texts(count + 10, seed)
    warm, texts = texts[:10], texts[10:]
    root = Path(tempfile.mkdtemp(prefix="bench-query-", dir=workdir))
    try:
        log(f"building a synthetic {n:,}-image index with encoder {encoder.spec} (dim {encoder.dim})")
        start = time.perf_counter()
        build_synthetic(root / "index", encoder, n, factory, seed).close()
        build_s = time.perf_counter() - start
        index = Index.open(root / "index", read_only=True)
        engine = QueryEngine(index)
        engine.search_texts(warm, "image", k)  # load the vectors, warm the encoder
        for text in warm:
            engine.search_texts([text], "image", k)

        log(f"timing {count} queries end to end and by stage")
        total, encode, search, fetch = (np.empty(count) for _ in range(4))
        for i, text in enumerate(texts):
            t0 = time.perf_counter()
            engine.search_texts([text], "image", k)
            t1 = time.perf_counter()
            vector = index.encoder.encode_texts([text])
            t2 = time.perf_counter()
            _, ids = index.search("image", vector, k)
            t3 = time.perf_counter()
            items = index.items([int(j) for j in ids[0] if j >= 0])
            for item in items:
                index.captions_of(item.id)
            t4 = time.perf_counter()
            total[i], encode[i], search[i], fetch[i] = (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3
        # The same queries with FAISS's OpenMP pool cut to one thread: on a loaded machine a
        # parallel region waits for every thread to be scheduled, which one query cannot repay.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            one = latencies_ms(lambda text: engine.search_texts([text], "image", k), texts)
        finally:
            faiss.omp_set_num_threads(threads)
        # What the search stage would cost on seesay's exact path (indexer.exact_search)
        # over the same stored vectors, for the same query vectors.
        images = index._set("image")
        exact = ExactSearch(images.vectors, images.ids)
        vectors = index.encoder.encode_texts(texts)
        exact_ms = latencies_ms(lambda v: exact.search(v[None], k), list(vectors))
        del exact
        index.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    e2e = percentiles(total)
    return {
        "benchmark": NAME,
        "n_items": n,
        "n_images": n,
        "n_captions": n,
        "factory": factory,
        "encoder": encoder.spec,
        "dim": encoder.dim,
        "k": k,
        "quick": quick,
        "machine": machine(),
        "build_s": build_s,
        "query_p50_ms": e2e["p50_ms"],
        "query_p99_ms": e2e["p99_ms"],
        "end_to_end": e2e,
        "faiss_threads": threads,
        "faiss_one_thread": percentiles(one),
        "stages": {"encode_text": percentiles(encode), "search": percentiles(search), "fetch_sql": percentiles(fetch)},
        "search_seesay_exact": percentiles(exact_ms),
        "latencies_ms": [round(float(v), 3) for v in total],
    }


def plot(result: dict[str, Any], out_dir) -> None:
    fig, ax = figure()
    series = {"end to end": np.array(result["latencies_ms"])}
    bins = np.linspace(0, np.percentile(series["end to end"], 99.5) * 1.1, 40)
    ax.hist(series["end to end"], bins=bins, alpha=0.8, label=f"end to end (FAISS on {result['faiss_threads']} threads)")
    for name, value, colour in (("p50", result["query_p50_ms"], "black"), ("p99", result["query_p99_ms"], "red")):
        ax.axvline(value, color=colour, ls="--", label=f"{name} {value:.1f} ms")
    stages = result["stages"]
    ax.set_title(
        f"text→image query, {result['n_items']:,} images, {result['encoder']} — median stages: "
        f"encode {stages['encode_text']['p50_ms']:.1f}, search {stages['search']['p50_ms']:.1f}, SQL {stages['fetch_sql']['p50_ms']:.1f} ms",
        fontsize=8,
    )
    ax.set_xlabel("latency per query (ms)")
    ax.set_ylabel("queries (count)")
    ax.legend()
    save_plot(fig, out_dir, NAME)
