"""Exact (flat) inner-product top-k search that picks, per batch size, the faster of two paths.

FAISS `IndexFlatIP` scans the database once per query for batches under its BLAS
threshold (20 queries), so a batch of 16 reads the vectors 16 times from memory; from
20 queries up it switches to BLAS with its own blocking. The blocked path here reads
the vectors once per batch whatever its size: a GEMM per database block against the
vectors stored transposed (a no-transpose GEMM, about twice as fast for few queries),
then each block's top k through a threshold from per-group maxima and `argpartition`
on the few entries above it. A single query is one row-major matrix-vector product.
Neither path wins at every size, so `ExactSearch` chooses per batch size: by a measured
calibration (`calibrate`) when it has one, by a fixed rule otherwise (blocked below
1,024 queries, where FAISS is weakest; FAISS's BLAS path from there up).

Scores are inner products; results are (scores, ids), each (nq, k), best first. Ties
between equal scores may be broken differently by the two paths.
"""
from __future__ import annotations

import time
from typing import Literal, Sequence

import faiss
import numpy as np

Method = Literal["faiss", "blocked"]
METHODS: tuple[Method, ...] = ("faiss", "blocked")
# Bytes of the (queries × database block) score matrix the blocked path aims for: about
# an L3 slice, so the filter re-reads scores from cache, while blocks stay wide enough for
# BLAS to run near its peak (measured: 1 MiB blocks ran at a third the speed of 16 MiB).
SCORE_BLOCK_BYTES = 1 << 24
MIN_BLOCK_ROWS = 256
# Fixed rule when not calibrated: blocked GEMM for batches in [lo, hi), FAISS otherwise.
DEFAULT_BLOCKED_RANGE = (1, 1024)


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


class ExactSearch:
    """Exact top-k over fixed vectors, by FAISS flat or blocked GEMM, whichever suits the batch.

    Builds a transposed copy of the vectors for the blocked path the first time a batch of
    several queries takes it (single queries read the vectors as they are), and a FAISS flat
    copy unless an existing exact index is passed as `flat`.

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
        return "blocked" if lo <= n_queries < hi else "faiss"

    def search(
        self, queries: np.ndarray, k: int, method: Method | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), best first; missing hits have id -1 and score -inf."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        method = method or self.method_for(len(queries))
        if method == "blocked":
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
