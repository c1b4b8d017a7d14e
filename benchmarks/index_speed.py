"""`seesay bench index`: build time, memory, latency, QPS and recall of flat, IVF-PQ and HNSW.

Vectors are random L2-normalised float32 (uniform on the sphere by default; `clustered`
draws them around 1,024 random centres, closer to real embeddings). Every FAISS index
is built through the project's wrapper (`indexer.vectors.VectorSet`, the class the
index uses), so build time and memory include what the engine keeps (its copy of the
vectors). Flat search is judged against the roofline measured in the same run
(`benchmarks.roofline`) at query batches of 1, 16, 64, 256 and 4,096: FAISS IndexFlatIP
itself (on all threads, as a user calls it, and on one), each of seesay's exact paths,
a plain numpy GEMM + argpartition, and seesay's exact search as a Flat index serves it
(`indexer.exact_search`: the path its own timings chose, after it has timed them on
that batch). Approximate indexes are swept over nprobe / efSearch; recall@10 is
against exact search.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import tempfile
import time
from typing import Any, Callable

import faiss
import numpy as np

from benchmarks import roofline
from benchmarks.report import best_time, figure, latencies_ms, machine, percentiles, rss_bytes, save_plot
from indexer.exact_search import ExactSearch
from indexer.path_choice import Path
from indexer.vectors import VectorSet

NAME = "index"
log = logging.getLogger(__name__)
ROOFLINE_BATCHES = (1, 16, 64, 256, 4096)
# The batch sizes flat_bandwidth_fraction is judged on (the list).
JUDGED_BATCHES = (1, 16, 256, 4096)
TARGET_RECALL = 0.95
# Untimed calls before each flat path's timing, in seconds (batches up to 256 queries).
WARM_UP_S = 0.3
DATA_KINDS = ("uniform", "clustered")
APPROXIMATE = ("ivfpq", "ivfsq", "hnsw")


def unit_vectors(n: int, d: int, rng: np.random.Generator, data: str = "uniform", centres: np.ndarray | None = None) -> np.ndarray:
    """n random unit vectors: uniform on the sphere, or scattered around `centres`."""
    if data == "uniform":
        x = rng.standard_normal((n, d), dtype=np.float32)
    elif data == "clustered":
        assert centres is not None
        x = centres[rng.integers(len(centres), size=n)] + 0.6 / math.sqrt(d) * rng.standard_normal((n, d), dtype=np.float32)
    else:
        raise ValueError(f"unknown data {data!r}: use uniform or clustered")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def numpy_topk(x: np.ndarray, q: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Baseline: plain numpy GEMM + argpartition, `chunk` queries at a time (to bound memory)."""
    n = len(x)
    out = np.empty((len(q), k), dtype=np.int64)
    for s in range(0, len(q), chunk):
        scores = q[s : s + chunk] @ x.T
        top = np.argpartition(scores, n - k, axis=1)[:, n - k :]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[s : s + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of each query's true top-k found in its returned top-k."""
    hits = sum(len(set(f[:k]) & set(t[:k])) for f, t in zip(found, truth))
    return hits / (k * len(truth))


def index_bytes(index: faiss.Index) -> int:
    """Size of the serialised FAISS index (written to a temporary file, not held in memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def build_set(factory: str, x: np.ndarray, ids: np.ndarray) -> tuple[VectorSet, dict[str, Any]]:
    """Build through the project's wrapper; time, RSS delta and index bytes."""
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    vs = VectorSet.empty("bench", x.shape[1], factory)
    vs.add(x, ids)
    seconds = time.perf_counter() - start
    return vs, {
        "factory": factory,
        "build_s": seconds,
        "rss_delta_bytes": rss_bytes() - before,
        "index_bytes": index_bytes(vs.index),
        "stored_vector_bytes": int(vs.vectors.nbytes),
    }


def set_param(vs: VectorSet, name: str, value: int) -> None:
    faiss.ParameterSpace().set_index_parameter(vs.index, name, value)


def _qps(search: Callable[[np.ndarray], Any], q: np.ndarray, repeats: int) -> float:
    return len(q) / best_time(lambda: search(q), repeats)


def run(
    n: int | None = None,
    d: int = 512,
    quick: bool = False,
    large: bool = False,
    data: str = "uniform",
    k: int = 10,
    seed: int = 0,
    indexes: tuple[str, ...] = APPROXIMATE,
    refine: tuple[int, ...] = (1, 4, 16),
) -> dict[str, Any]:
    """Run the index benchmark and return its JSON-ready result."""
    n = n or (20_000 if quick else 1_000_000 if large else 100_000)
    rng = np.random.default_rng(seed)
    big = n >= 500_000  # fewer repeats and no numpy baseline at 4,096 queries: minutes each
    qps_batch = 256 if quick else 1024
    repeats = 2 if quick else 3

    log.info("measuring the roofline (read bandwidth, sgemm)")
    roof = roofline.measure(quick)
    centres = unit_vectors(1024, d, rng) if data == "clustered" else None
    x = unit_vectors(n, d, rng, data, centres)
    ids = np.arange(n, dtype=np.int64)
    q_eval = unit_vectors(qps_batch, d, rng, data, centres)
    q_single = unit_vectors(30 if quick else 50 if big else 200, d, rng, data, centres)
    result: dict[str, Any] = {
        "benchmark": NAME,
        "n": n,
        "d": d,
        "k": k,
        "data": data,
        "quick": quick,
        "machine": machine(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "roofline": roof.to_dict(),
    }

    log.info(f"building flat over {n}×{d}")
    flat, flat_info = build_set("Flat", x, ids)
    exact = ExactSearch(flat.vectors, flat.ids, flat=flat.index)
    extras = exact_extras(exact)  # made up front, as an index in steady use has them
    rows = []
    for nq in ROOFLINE_BATCHES:
        q = unit_vectors(nq, d, rng, data, centres)
        rows.append(flat_row(exact, roof, x, q, k, repeats if nq <= 256 else 1, skip_others=big and nq > 256))
        log.info(f"  batch {nq}: bound {rows[-1]['bound_s'] * 1e3:.1f} ms; FAISS {rows[-1]['faiss_fraction']:.2f}, seesay "
                 f"{rows[-1]['seesay_fraction']:.2f} ({rows[-1]['seesay_method']}, {rows[-1]['seesay_over_faiss']:.2f}× FAISS)")
    result["flat_roofline"] = rows
    result.update(flat_summary(rows))
    result["load_average_after_flat"] = [round(v, 2) for v in os.getloadavg()]

    log.info("flat: ground truth, QPS and single-query latency")
    _, truth = exact.search(q_eval, k)
    result["indexes"] = {"flat": {**flat_info, **extras, **flat_speed(exact, q_eval, q_single, k, repeats)}}
    result["numpy_bruteforce"] = {
        "qps": _qps(lambda q: numpy_topk(x, q, k), q_eval[:256] if big else q_eval, 1),
        "latency": percentiles(latencies_ms(lambda q: numpy_topk(x, q[None], k), list(q_single))),
    }
    result["gpu"] = _gpu_flat(flat, q_eval, truth, k, repeats)
    del exact, flat
    gc.collect()

    flat_qps = result["indexes"]["flat"]["qps"]
    for name in indexes:
        factory, settings = approximate_specs(n, d, quick, refine)[name]
        log.info(f"building {factory}")
        result["indexes"][name] = sweep_index(factory, settings, x, ids, q_eval, q_single, truth, k, repeats, flat_qps)
        gc.collect()
    result.update(ann_summary(result["indexes"]))
    return result


def steady(fn: Callable[[], Any], warm: bool, repeats: int) -> float:
    """Best time of `repeats` calls, after untimed calls for WARM_UP_S when `warm`: by then the
    library's thread pool has the cores back from the previous library's, whose idle threads
    spin for a while after each call (OpenBLAS's for about 0.1 s; RESULTS.md)."""
    deadline = time.perf_counter() + WARM_UP_S
    while warm and time.perf_counter() < deadline:
        fn()
    return best_time(fn, repeats)


def flat_row(
    exact: ExactSearch, roof: roofline.Roofline, x: np.ndarray, q: np.ndarray, k: int, repeats: int, skip_others: bool
) -> dict[str, Any]:
    """One batch size of flat search: FAISS itself, each of seesay's paths, numpy, and what
    seesay's dispatcher chose (after timing its paths on this batch: `settle_s`), against the bound."""
    nq, (n, d) = len(q), x.shape
    warm = nq <= 256
    start = time.perf_counter()
    while exact.path_for(nq, k) is None:  # the dispatcher times its paths on these very searches
        exact.search(q, k)
    settle_s = time.perf_counter() - start
    path = exact.path_for(nq, k)
    # the figures compared (seesay against FAISS) are best of at least 2 even for the largest batch
    t_seesay = steady(lambda: exact.search(q, k), warm, max(repeats, 2))
    path = exact.path_for(nq, k) or path  # (None while a runner-up is being re-timed)
    times = {  # FAISS IndexFlatIP itself, on all threads (as a user calls it) and on one
        "faiss": steady(lambda: exact.search(q, k, "faiss"), warm, max(repeats, 2)),
        "faiss_serial": steady(lambda: exact.search(q, k, Path("faiss", serial=True)), warm, max(repeats, 2)),
    }
    for method in ("blocked", "screened"):
        times[method] = float("nan") if skip_others else steady(lambda m=method: exact.search(q, k, m), warm, repeats)
    times["numpy"] = float("nan") if skip_others else steady(lambda: numpy_topk(x, q, k), warm, repeats)
    bound = roof.bound_s(nq, n, d)
    # the stricter bound: charged with the bytes the chosen path reads (int8 codes: 1 per value)
    own_bound = roof.bound_s(nq, n, d, 1.0 if path.method == "screened" else 4.0)
    row: dict[str, Any] = {
        "batch": nq,
        "bound_s": bound,
        "bound_kind": "bandwidth" if 4.0 * n * d / roof.read_bytes_per_s >= 2.0 * nq * n * d / roof.sgemm_flops_per_s else "compute",
        "seesay_method": str(path),
        "seesay_s": t_seesay,
        "seesay_fraction": bound / t_seesay,
        "seesay_over_faiss": times["faiss"] / t_seesay,
        "seesay_over_best_faiss": min(times["faiss"], times["faiss_serial"]) / t_seesay,
        "seesay_settle_s": settle_s,
        "seesay_path_s_per_query": exact.table(nq, k).summary(),
        "seesay_own_bytes_bound_s": own_bound,
        "seesay_fraction_own_bytes": own_bound / t_seesay,
    }
    for name, seconds in times.items():
        row[f"{name}_s"] = None if seconds != seconds else seconds
        row[f"{name}_fraction"] = None if seconds != seconds else bound / seconds
    return row


def flat_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline figures: worst fractions over the judged batches, and seesay against FAISS."""
    judged = [row for row in rows if row["batch"] in JUDGED_BATCHES]
    return {
        "flat_bandwidth_fraction": min(row["seesay_fraction"] for row in judged),
        "flat_bandwidth_fraction_own_bytes": min(row["seesay_fraction_own_bytes"] for row in judged),
        "flat_bandwidth_fraction_faiss": min(row["faiss_fraction"] for row in judged),
        "flat_bandwidth_fraction_numpy": min((row["numpy_fraction"] for row in judged if row["numpy_fraction"] is not None), default=None),
        "flat_min_speed_over_faiss": min(row["seesay_over_faiss"] for row in rows),
        "flat_min_speed_over_best_faiss": min(row["seesay_over_best_faiss"] for row in rows),
    }


def exact_extras(exact: ExactSearch) -> dict[str, Any]:
    """What seesay's exact search keeps beside the vectors: int8 codes and the transposed copy."""
    start = time.perf_counter()
    before = rss_bytes()
    extra = exact.codes.codes.numel() + exact.columns.nbytes
    return {
        "seesay_exact_extra_build_s": time.perf_counter() - start,
        "seesay_exact_extra_bytes": int(extra),
        "seesay_exact_rss_delta_bytes": rss_bytes() - before,
    }


def flat_speed(exact: ExactSearch, q_eval: np.ndarray, q_single: np.ndarray, k: int, repeats: int) -> dict[str, Any]:
    """QPS on batches and single-query latency, FAISS against seesay's chosen path."""
    qps_faiss = _qps(lambda q: exact.search(q, k, "faiss"), q_eval, repeats)
    qps_seesay = _qps(lambda q: exact.search(q, k), q_eval, repeats)
    return {
        "qps_batch": len(q_eval),
        "qps_faiss": qps_faiss,
        "qps_seesay": qps_seesay,
        "qps": max(qps_faiss, qps_seesay),
        "latency_faiss": percentiles(latencies_ms(lambda q: exact.search(q[None], k, "faiss"), list(q_single))),
        "latency_seesay": percentiles(latencies_ms(lambda q: exact.search(q[None], k), list(q_single))),
        "recall_at_10": 1.0,
    }


def approximate_specs(n: int, d: int, quick: bool, refine: tuple[int, ...]) -> dict[str, tuple[str, list[dict[str, int]]]]:
    """{name: (factory, settings to sweep)} for the approximate indexes at this size.

    IVF-PQ uses 4-bit fast-scan codes (d/8 sub-quantizers): 8-bit PQ64 took 10× longer to
    train here. IVF-SQ8 keeps one byte per value (4× IVF-PQ's codes, a quarter of the
    vectors), so its scores are close to exact. Candidates of both are re-ranked on the
    exact vectors (RFlat) with k_factor_rf × k candidates; k_factor_rf=1 re-scores only the
    k found, i.e. the plain index's recall.
    """
    nlist = int(2 ** round(math.log2(2 * math.sqrt(n))))
    probes = [p for p in ((1, 4, 16, 64) if quick else (1, 4, 16, 64, 256)) if p <= nlist]
    refined = [{"nprobe": p, "k_factor_rf": f} for p in probes for f in refine]
    return {
        "ivfpq": (f"IVF{nlist},PQ{d // 8}x4fs,RFlat", refined),
        "ivfsq": (f"IVF{nlist},SQ8,RFlat", refined),
        "hnsw": ("HNSW32", [{"efSearch": e} for e in ((16, 64, 256, 512) if quick else (16, 32, 64, 128, 256, 512, 1024))]),
    }


def sweep_index(
    factory: str, settings: list[dict[str, int]], x: np.ndarray, ids: np.ndarray, q_eval: np.ndarray,
    q_single: np.ndarray, truth: np.ndarray, k: int, repeats: int, flat_qps: float,
) -> dict[str, Any]:
    """Build one approximate index, sweep its settings, keep the fastest at the target recall."""
    vs, info = build_set(factory, x, ids)
    sweep = []
    for setting in settings:
        for param, value in setting.items():
            set_param(vs, param, value)
        found = vs.search(q_eval, k)[1]
        qps = _qps(lambda q: vs.search(q, k), q_eval, repeats)
        sweep.append({**setting, "recall_at_10": recall_at(found, truth, k), "qps": qps})
        log.info(f"  {setting}: recall@10 {sweep[-1]['recall_at_10']:.3f}, {qps:.0f} QPS")
    good = [s for s in sweep if s["recall_at_10"] >= TARGET_RECALL]
    pick = max(good, key=lambda s: s["qps"]) if good else max(sweep, key=lambda s: (s["recall_at_10"], s["qps"]))
    chosen = {p: pick[p] for p in settings[0]}
    for param, value in chosen.items():
        set_param(vs, param, value)
    return {
        **info,
        "params": list(settings[0]),
        "sweep": sweep,
        "chosen": chosen,
        "recall_at_10": pick["recall_at_10"],
        "qps": pick["qps"],
        "speedup_over_flat": pick["qps"] / flat_qps,
        "latency": percentiles(latencies_ms(lambda q: vs.search(q[None], k), list(q_single))),
    }


def ann_summary(indexes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The best approximate index: fastest at the target recall, else the most accurate."""
    approx = {name: r for name, r in indexes.items() if name != "flat"}
    if not approx:
        return {}
    good = {name: r for name, r in approx.items() if r["recall_at_10"] >= TARGET_RECALL}
    pool = good or approx
    best = max(pool, key=lambda name: (pool[name]["qps"] if good else pool[name]["recall_at_10"]))
    return {
        "ann_index": best,
        "ann_params": approx[best]["chosen"],
        "ann_recall_at_10": approx[best]["recall_at_10"],
        "ann_speedup": approx[best]["speedup_over_flat"],
    }


def _gpu_flat(flat: VectorSet, q: np.ndarray, truth: np.ndarray, k: int, repeats: int) -> dict[str, Any]:
    """FAISS GPU flat QPS where FAISS sees a GPU; otherwise why not."""
    gpus = faiss.get_num_gpus()
    if gpus == 0:
        return {"available": False, "reason": "faiss.get_num_gpus() == 0"}
    try:
        gpu = faiss.index_cpu_to_all_gpus(flat.index)
        found = gpu.search(q, k)[1]
        return {
            "available": True,
            "gpus": gpus,
            "qps": _qps(lambda b: gpu.search(b, k), q, repeats),
            "recall_at_10": recall_at(found, truth, k),
        }
    except RuntimeError as exc:
        return {"available": False, "reason": str(exc).splitlines()[-1] if str(exc) else "RuntimeError"}


def plot(result: dict[str, Any], out_dir) -> None:
    fig, (left, right) = figure(ncols=2, width=12)
    rows = result["flat_roofline"]
    batches = [r["batch"] for r in rows]
    lines = (("faiss_fraction", "FAISS IndexFlatIP", "-"), ("seesay_fraction", "seesay exact", "-"),
             ("seesay_fraction_own_bytes", "seesay exact, bound on the bytes it reads", ":"),
             ("numpy_fraction", "numpy GEMM+argpartition", "-"))
    for key, label, style in lines:
        left.plot(batches, [np.nan if r.get(key) is None else r[key] for r in rows], marker="o", ls=style, label=label)
    left.axhline(1.0, color="grey", lw=0.8, ls="--")
    left.set_xscale("log", base=2)
    left.set_xlabel("query batch size (queries per search call)")
    left.set_ylabel("roofline bound time / measured time (fraction)")
    left.set_title(f"flat search, {result['n']:,}×{result['d']}")
    left.legend()
    flat_qps = result["indexes"]["flat"]["qps"]
    for name, r in result["indexes"].items():
        if "sweep" in r:
            right.scatter([s["qps"] for s in r["sweep"]], [s["recall_at_10"] for s in r["sweep"]], label=f"{name} (sweep of {', '.join(r['params'])})")
    right.scatter([flat_qps], [1.0], color="black", marker="*", s=80, label="flat (exact)", zorder=3)
    right.axhline(TARGET_RECALL, color="grey", lw=0.8, ls="--")
    right.set_xscale("log")
    right.set_xlabel(f"throughput (queries/s, batches of {result['indexes']['flat']['qps_batch']})")
    right.set_ylabel("recall@10 vs exact search")
    right.set_title("approximate indexes")
    right.legend(fontsize=8)
    save_plot(fig, out_dir, NAME)
