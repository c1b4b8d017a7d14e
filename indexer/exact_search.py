"""Exact (flat) inner-product top-k search that picks, per batch size, the faster of two paths.

FAISS `IndexFlatIP` scans the database once per query for batches under its BLAS
threshold (20 queries), so a batch of 16 reads the vectors 16 times from memory; from
20 queries up it switches to BLAS with its own blocking. The blocked path here reads
the vectors once per batch whatever its size: a GEMM per database block against the
vectors stored transposed (a no-transpose GEMM, about twice as fast for few queries),
then each block's top k through a threshold from per-group maxima and `argpartition`
on the few entries above it. A single query is one row-major matrix-vector product.
A third path, `screened`, is exact too: it scores a bfloat16 copy of the vectors (half
the bytes, and the CPU's bf16 dot-product units where it has them), keeps every vector
whose approximate score could still reach the top k under a proven bound on the
rounding error, and re-scores those few in float32. Neither path wins at every size, so
`ExactSearch` chooses per batch size: by a measured calibration (`calibrate`) when it
has one, by a fixed rule otherwise (below 256 queries, where FAISS is weakest, blocked
for one query and screened for more where the CPU has bf16 dot products; FAISS's BLAS
path from 256 up).

Scores are inner products; results are (scores, ids), each (nq, k), best first. Ties
between equal scores may be broken differently by the two paths.
"""
from __future__ import annotations

import time
import warnings
from functools import cached_property, lru_cache
from typing import Literal, Sequence

import faiss
import numpy as np

Method = Literal["faiss", "blocked", "screened"]
METHODS: tuple[Method, ...] = ("faiss", "blocked", "screened")
# Bytes of the (queries × database block) score matrix the blocked path aims for: about
# an L3 slice, so the filter re-reads scores from cache, while blocks stay wide enough for
# BLAS to run near its peak (measured: 1 MiB blocks ran at a third the speed of 16 MiB).
SCORE_BLOCK_BYTES = 1 << 24
MIN_BLOCK_ROWS = 256
# Fixed rule when not calibrated: seesay's paths for batches in [lo, hi), FAISS's BLAS path
# from hi up; within the range, blocked for one query and screened for more where the CPU
# has bf16 dot products (blocked elsewhere). Measured at 100k × 512 on 2 cores: FAISS
# wins from 256 queries, the screen below.
DEFAULT_BLOCKED_RANGE = (1, 256)
# The screen pays off for small batches; large ones get short database blocks, where
# keeping the best few of each block re-scores a large share of the corpus.
SCREEN_MAX_QUERIES = 1024


def block_rows(n_queries: int, n: int, score_bytes: int = SCORE_BLOCK_BYTES) -> int:
    """Database rows per block so that the score block is about `score_bytes`."""
    rows = score_bytes // (4 * max(n_queries, 1))
    return int(min(max(rows, MIN_BLOCK_ROWS), max(n, 1)))


def blocked_topk(
    columns: np.ndarray,
    queries: np.ndarray,
    k: int,
    ids: np.ndarray | None = None,
    score_bytes: int = SCORE_BLOCK_BYTES,
    vectors: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products by a GEMM per database block and a filtered argpartition.

    `columns` is the database stored transposed, (d, n) float32 C-contiguous: with the
    vectors as columns the product queries @ block is a plain (no-transpose) GEMM, which
    BLAS runs about twice as fast as against row-major vectors for small query batches.
    The database is read once per call, block by block. Returns (scores, ids), each
    (nq, k), best first; rows with fewer than k database vectors are padded with score
    -inf and id -1. `ids` maps database positions to ids (positions if None). A single
    query is a matrix-vector product: given `vectors` (the same database, row-major) it
    runs over those, one dot product per row, which streams better than over `columns`.
    """
    columns = np.asarray(columns, dtype=np.float32)
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    nq, n = len(queries), columns.shape[1]
    out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
    out_ids = np.full((nq, k), -1, dtype=np.int64)
    if n == 0 or nq == 0:
        return out_scores, out_ids
    kk = min(k, n)
    rows = max(block_rows(nq, n, score_bytes), kk)
    cand_scores: list[np.ndarray] = []
    cand_pos: list[np.ndarray] = []
    if nq == 1 and vectors is not None:
        top_scores, top = _block_topk(np.dot(vectors, queries[0])[None, :], kk)
        cand_scores.append(top_scores)
        cand_pos.append(top)
    else:
        buf = np.empty((nq, rows), dtype=np.float32)
        for start in range(0, n, rows):
            block = columns[:, start : start + rows]  # a strided view BLAS reads in place
            b = block.shape[1]
            scores = buf if b == rows else np.empty((nq, b), dtype=np.float32)
            np.matmul(queries, block, out=scores)
            top_scores, top = _block_topk(scores, kk)
            cand_scores.append(top_scores)
            cand_pos.append(top + start)
    all_scores = np.concatenate(cand_scores, axis=1)
    all_pos = np.concatenate(cand_pos, axis=1)
    if all_scores.shape[1] > kk:
        top = np.argpartition(all_scores, all_scores.shape[1] - kk, axis=1)[:, -kk:]
        all_scores = np.take_along_axis(all_scores, top, axis=1)
        all_pos = np.take_along_axis(all_pos, top, axis=1)
    order = np.argsort(-all_scores, axis=1, kind="stable")
    out_scores[:, :kk] = np.take_along_axis(all_scores, order, axis=1)
    pos = np.take_along_axis(all_pos, order, axis=1)
    out_ids[:, :kk] = pos if ids is None else np.asarray(ids, dtype=np.int64)[pos]
    return out_scores, out_ids


# Group width of the threshold filter: the k-th largest of the per-group maxima is a
# score that at least k entries reach, so only entries at or above it can be in the top k.
GROUP = 64


def _block_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest (scores, column positions), unordered, k ≤ row length.

    Wide rows are first filtered by a threshold from per-group maxima (one vectorised
    pass), so `argpartition` runs on a few candidates instead of the whole row.
    """
    nq, b = scores.shape
    if b <= k:
        return scores.copy(), np.broadcast_to(np.arange(b), (nq, b)).copy()
    groups = b // GROUP
    if groups < 4 * k:
        top = np.argpartition(scores, b - k, axis=1)[:, b - k :]
        return np.take_along_axis(scores, top, axis=1), top
    maxima = scores[:, : groups * GROUP].reshape(nq, groups, GROUP).max(axis=2)
    threshold = np.partition(maxima, groups - k, axis=1)[:, groups - k]
    rows, cols = np.nonzero(scores >= threshold[:, None])
    counts = np.bincount(rows, minlength=nq)
    if counts.min() < k:  # only with NaN scores: fall back on a full partition
        top = np.argpartition(scores, b - k, axis=1)[:, b - k :]
        return np.take_along_axis(scores, top, axis=1), top
    width = int(counts.max())
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    cand = np.full((nq, width), -np.inf, dtype=scores.dtype)
    pos = np.zeros((nq, width), dtype=np.int64)
    cand[rows, slot] = scores[rows, cols]
    pos[rows, slot] = cols
    if width > k:
        top = np.argpartition(cand, width - k, axis=1)[:, width - k :]
        return np.take_along_axis(cand, top, axis=1), np.take_along_axis(pos, top, axis=1)
    return cand, pos


# bfloat16 keeps 8 significant bits: each rounding moves a value by at most this fraction.
BF16_UNIT_ROUNDOFF = 2.0 ** -8
# The screened path gives up (and runs `blocked`) when the candidates to re-score exceed
# this share of the scores computed: only near-duplicate corpora get there.
MAX_CANDIDATE_SHARE = 1 / 16
# Sorted scores taken per query and block beyond k; rows whose candidates outnumber them are scanned whole.
SCREEN_EXTRA = 246


def screening_margin(query_norms: np.ndarray, max_vector_norm: float, d: int) -> np.ndarray:
    """Per query, a bound on |exact score − bf16 score| for every database vector.

    bf16 inputs: q·x − qb·xb ≤ (2u + u²)·Σ|q_i x_i| ≤ (2u + u²)·‖q‖‖x‖ (Cauchy–Schwarz);
    float32 accumulation of d products: ≤ d·2⁻²⁴·Σ|qb_i xb_i|; the bf16 result: ≤ u·|s̃|;
    with Σ|qb_i xb_i| and |s̃| ≤ (1 + u)²‖q‖‖x‖. Doubled accumulation term for safety.
    """
    u = BF16_UNIT_ROUNDOFF
    factor = 2 * u + u * u + (u + 2 * d * 2.0 ** -24) * (1 + u) ** 2
    return factor * query_norms * max_vector_norm


def screened_topk(
    vectors: np.ndarray, low, queries: np.ndarray, k: int, max_norm: float, ids: np.ndarray | None = None,
    score_bytes: int = SCORE_BLOCK_BYTES,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact top-k by a bf16 screen and a float32 re-score; None when too many candidates
    survive, or for batches over `SCREEN_MAX_QUERIES`.

    `low` is `vectors` as a (n, d) torch bfloat16 tensor and `max_norm` their largest row
    norm. A vector in the true top k scores at least s_k (the true k-th score) exactly,
    so at least s_k − m in bf16 (m = `screening_margin`); and s_k ≥ t − m, where t is any
    k-th largest bf16 score seen so far. Every vector with a bf16 score ≥ t − 2m is kept
    and re-scored in float32, so nothing of the top k is lost.
    """
    import torch

    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    nq, n = len(queries), len(vectors)
    if nq > SCREEN_MAX_QUERIES:
        return None
    kk = min(k, n)
    margin = torch.from_numpy(2 * screening_margin(np.linalg.norm(queries, axis=1), max_norm, vectors.shape[1]))
    q_low = torch.from_numpy(queries).to(torch.bfloat16)
    rows = max(block_rows(nq, n, score_bytes * 2), kk)  # bf16 scores: twice the rows per byte budget
    kth = torch.full((nq,), -float("inf"))
    found_q: list[np.ndarray] = []
    found_r: list[np.ndarray] = []
    budget = MAX_CANDIDATE_SHARE * nq * n + nq * kk
    kept = 0
    for start in range(0, n, rows):
        scores = q_low @ low[start : start + rows].T  # (nq, block rows) in bf16
        b = scores.shape[1]
        # The candidates are nearly always among each row's best few: take those sorted, and
        # scan a whole row only where even its last one still passes the threshold.
        vals, pos = scores.topk(min(b, kk + SCREEN_EXTRA), dim=1)
        vals = vals.float()
        if b >= kk:
            kth = torch.maximum(kth, vals[:, kk - 1])
        threshold = kth - margin
        keep = (vals >= threshold[:, None]).numpy()
        q, j = np.nonzero(keep)
        r = pos.numpy()[q, j]
        spill = np.flatnonzero(keep[:, -1]) if vals.shape[1] < b else np.zeros(0, dtype=np.int64)
        if len(spill):  # rows with more candidates than the sorted few: scan them whole
            q_rest = ~np.isin(q, spill)
            q, r = q[q_rest], r[q_rest]
            wide = (scores[torch.from_numpy(spill)].float() >= threshold[spill][:, None]).numpy()
            sq, sr = np.nonzero(wide)
            q, r = np.concatenate([q, spill[sq]]), np.concatenate([r, sr])
        kept += len(r)
        if kept > budget:
            return None
        found_q.append(q)
        found_r.append(r + start)
    cand_q = np.concatenate(found_q)
    cand_r = np.concatenate(found_r)
    exact = np.einsum("cd,cd->c", vectors[cand_r], queries[cand_q])
    order = np.lexsort((-exact, cand_q))  # by query, best first
    cand_q, cand_r, exact = cand_q[order], cand_r[order], exact[order]
    first = np.searchsorted(cand_q, np.arange(nq))
    rank = np.arange(len(cand_q)) - first[cand_q]
    top = rank < kk
    out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
    out_ids = np.full((nq, k), -1, dtype=np.int64)
    out_scores[cand_q[top], rank[top]] = exact[top]
    out_ids[cand_q[top], rank[top]] = cand_r[top] if ids is None else np.asarray(ids, dtype=np.int64)[cand_r[top]]
    return out_scores, out_ids


@lru_cache(maxsize=1)
def cpu_has_bf16_dot() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere torch emulates it, slowly."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class ExactSearch:
    """Exact top-k over fixed vectors, by FAISS flat or blocked GEMM, whichever suits the batch.

    Builds a transposed copy of the vectors for the blocked path the first time a batch of
    several queries takes it (single queries read the vectors as they are), a bfloat16 copy
    (half the size) the first time the screened path runs, and a FAISS flat copy unless an
    existing exact index is passed as `flat`.

    `choice` maps a batch-size bucket (the power of two at or below the batch size)
    to the method measured fastest there; buckets not calibrated use the fixed rule.
    """

    def __init__(
        self, vectors: np.ndarray, ids: np.ndarray | None = None, flat: faiss.Index | None = None
    ) -> None:
        """`flat`: an existing exact FAISS index over the same vectors that returns ids
        itself (e.g. the index wrapper's IndexIDMap2 over Flat), used instead of a new copy."""
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._columns: np.ndarray | None = None
        self.ids = None if ids is None else np.ascontiguousarray(ids, dtype=np.int64)
        self._flat_gives_ids = flat is not None
        if flat is None:
            flat = faiss.IndexFlatIP(self.vectors.shape[1])
            if len(self.vectors):
                flat.add(self.vectors)
        self.flat = flat
        self.choice: dict[int, Method] = {}

    @property
    def columns(self) -> np.ndarray:
        """The vectors transposed, (d, n) C-contiguous, made on first use."""
        if self._columns is None:
            self._columns = np.ascontiguousarray(self.vectors.T)
        return self._columns

    @property
    def low(self):
        """The vectors as a torch bfloat16 tensor (half the bytes), made on first use."""
        return self._screen[0]

    @property
    def max_norm(self) -> float:
        """The largest vector norm, which scales the screen's error bound."""
        return self._screen[1]

    @cached_property
    def _screen(self) -> tuple:
        """(the bf16 copy, the largest vector norm): what the screened path needs."""
        import torch

        with warnings.catch_warnings():  # memory-mapped vectors are read-only; this only reads them
            warnings.simplefilter("ignore", UserWarning)
            low = torch.from_numpy(self.vectors).to(torch.bfloat16)
        return low, float(np.linalg.norm(self.vectors, axis=1).max()) if len(self.vectors) else 0.0

    def _screenable(self, queries: np.ndarray) -> bool:
        """The screen's error bound holds: finite queries and vectors, something to search."""
        return bool(len(queries) and len(self.vectors) and np.isfinite(queries).all() and np.isfinite(self.max_norm))

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return len(self.vectors)

    @staticmethod
    def bucket(n_queries: int) -> int:
        return 1 << (max(n_queries, 1).bit_length() - 1)

    def method_for(self, n_queries: int) -> Method:
        """The path a batch of `n_queries` takes."""
        bucket = self.bucket(n_queries)
        if bucket in self.choice:
            return self.choice[bucket]
        lo, hi = DEFAULT_BLOCKED_RANGE
        if not lo <= n_queries < hi:
            return "faiss"
        return "screened" if n_queries > 1 and cpu_has_bf16_dot() else "blocked"

    def search(
        self, queries: np.ndarray, k: int, method: Method | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), best first; missing hits have id -1 and score -inf."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        method = method or self.method_for(len(queries))
        if method == "screened" and self._screenable(queries):
            found = screened_topk(self.vectors, self.low, queries, k, self.max_norm, self.ids)
            if found is not None:
                return found
            method = "blocked"  # near-duplicates everywhere: the screen keeps too much
        if method in ("blocked", "screened"):
            columns = self.vectors.T if len(queries) == 1 else self.columns  # one query reads `vectors`
            return blocked_topk(columns, queries, k, self.ids, vectors=self.vectors)
        if method != "faiss":
            raise ValueError(f"unknown exact-search method {method!r}; use one of {METHODS}")
        nq = len(queries)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        kk = min(k, len(self.vectors))
        if kk == 0 or nq == 0:
            return scores, ids
        found_scores, pos = self.flat.search(queries, kk)
        scores[:, :kk] = found_scores
        if self._flat_gives_ids or self.ids is None:
            ids[:, :kk] = pos
        else:
            ids[:, :kk] = np.where(pos >= 0, self.ids[np.maximum(pos, 0)], -1)
        return scores, ids

    def time_method(self, method: Method, queries: np.ndarray, k: int, repeats: int = 3) -> float:
        """Best wall time in seconds of `repeats` searches of `queries` by `method`."""
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self.search(queries, k, method)
            best = min(best, time.perf_counter() - start)
        return best

    def calibrate(
        self, batch_sizes: Sequence[int] = (1, 4, 16, 64, 256, 1024, 4096), k: int = 10, repeats: int = 3, seed: int = 0
    ) -> dict[int, dict[str, float]]:
        """Time both paths on random unit queries at each batch size; keep the faster per bucket.

        Returns {batch size: {method: seconds}}.
        """
        rng = np.random.default_rng(seed)
        timings: dict[int, dict[str, float]] = {}
        for nq in batch_sizes:
            q = rng.standard_normal((nq, self.dim), dtype=np.float32)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            timings[nq] = {m: self.time_method(m, q, k, repeats) for m in METHODS}
            self.choice[self.bucket(nq)] = min(METHODS, key=lambda m: timings[nq][m])
        return timings
