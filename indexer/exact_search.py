"""Exact (flat) inner-product top-k search by the fastest of three paths, chosen by timing them here.

FAISS `IndexFlatIP` scans the database once per query for batches under its BLAS
threshold (20 queries), so a batch of 16 reads the vectors 16 times from memory; from
20 queries up it switches to BLAS with its own blocking. The blocked path here reads
the vectors once per batch of up to 256 queries: a GEMM per database block against the
vectors stored transposed (a no-transpose GEMM, about twice as fast for few queries),
then each block's top k through a threshold from per-group maxima and `argpartition`
on the few entries above it. A single query is one row-major matrix-vector product.
The screened path is exact too: it scores int8 codes of the vectors (a quarter of the
bytes, and the CPU's int8 dot-product units) as exact integer sums, keeps every vector
whose code score could still reach the top k under a proven bound on the rounding
error, and re-scores those few in float32 with FAISS. `ExactSearch` times the paths
(each on all threads and on one) on its own searches and serves each batch size by the
fastest (`indexer.path_choice`): no rule fixed in advance holds across machines and loads.

Scores are inner products; results are (scores, ids), each (nq, k), best first. Ties
between equal scores may be broken differently by the paths.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Literal

import faiss
import numpy as np

from indexer.path_choice import Path, PathTable, nearest_best, parallel_threads, table_for, threads_for

if TYPE_CHECKING:
    import torch

Method = Literal["faiss", "blocked", "screened"]
METHODS: tuple[Method, ...] = ("faiss", "blocked", "screened")
# Bytes of the (queries × database block) score matrix the blocked path aims for: about
# an L3 slice, so the filter re-reads scores from cache, while blocks stay wide enough for
# BLAS to run near its peak (measured: 1 MiB blocks ran at a third the speed of 16 MiB).
SCORE_BLOCK_BYTES = 1 << 24
MIN_BLOCK_ROWS = 256
# The blocked path runs batches in chunks of this many queries: its score blocks then
# keep 16k database rows, wide enough for the group filter (at 4,096 queries a block of
# 1,024 rows left it a single-threaded argpartition over every score).
BLOCKED_MAX_QUERIES = 256
# The screen runs batches in chunks of this many queries. Measured at 100k × 512 on 2
# cores: 64 beat 32, 48, 96, 128, 256 and 512 at 256 and 1,024 queries; the int8 GEMM's
# time per query is lowest near 64 rows, and fewer queries leave longer database blocks,
# whose k-th best code score is a tighter threshold.
SCREEN_MAX_QUERIES = 64
# Building the int8 codes costs about this many single-query scans of the vectors (0.35 s
# against 8.6 ms at 100k × 512 on 2 cores). Single queries go without the codes until
# searches without them have cost as much (ski rental): a one-off query (`seesay search`)
# never pays for them, and an index in steady use has them after a few dozen queries.
# Batches may try the screen at once: it gains more than it costs from a few hundred queries up.
CODES_BUILD_SCANS = 40
# A batch of this many queries or more whose path is not chosen yet times the open paths
# on slices of itself (1/EXPLORE_SLICES of it, at least EXPLORE_MIN_SLICE queries: from
# there every path's time per query is about flat), then runs the rest by the fastest.
EXPLORE_FROM = 1024
EXPLORE_SLICES = 16
EXPLORE_MIN_SLICE = 256
# Each path finds this many more than k; the final k are re-scored by one routine and
# ordered by (score, id) (`ExactSearch._final`), so paths that break ties or round the
# last bit differently still return the same answer while fewer than this many tie.
TIE_EXTRA = 8


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


# The screened path gives up (and runs `blocked`) when the candidates to re-score exceed
# this share of the scores computed: only near-duplicate corpora get there.
MAX_CANDIDATE_SHARE = 1 / 16
# int8 codes: an int32 sum of d products of at most 127² stays exact up to this dimension.
INT8_MAX_DIM = (2**31 - 1) // 127**2
# Relative slack on the screen's error bound, for the float64 rounding in combining its terms.
MARGIN_SLACK = 1e-6
# Rows quantised at a time: the float32 temporaries stay near 128 MiB for d = 512.
ENCODE_CHUNK = 1 << 16
# float32's unit roundoff.
F32_ROUNDOFF = 2.0**-24


@dataclass(frozen=True)
class Int8Codes:
    """Vectors as int8 codes, x ≈ scale · codes, with what the screen's error bound needs.

    `codes` is (n, d) torch int8 on one `scale` for all rows; `max_error` bounds
    ‖x − scale·codes‖ and `max_norm` bounds ‖scale·codes‖ over the rows.
    """

    codes: "torch.Tensor"
    scale: float
    max_error: float
    max_norm: float


def int8_encode(x: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, errors, norms): `x` rounded to int8 multiples of `scale` (float32, (n, 1) or
    (1, 1)), and for each row upper bounds on ‖x − scale·codes‖ and on ‖scale·codes‖.

    Both are computed in float32 (torch, all threads) and widened to cover its rounding:
    forming x − scale·codes errs by at most 2u(|x_i| + scale) per entry, and a float32 norm
    of d terms by a factor under 1 + 2(d + 2)u (u = 2⁻²⁴).
    """
    import torch

    d = x.shape[1]
    widen = 1 + 2 * (d + 2) * F32_ROUNDOFF
    codes = np.empty(x.shape, dtype=np.int8)
    errors = np.empty(len(x))
    norms = np.empty(len(x))
    steps = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32))
    for start in range(0, len(x), ENCODE_CHUNK):
        part = slice(start, start + ENCODE_CHUNK)
        rows = torch.from_numpy(x[part])
        step = steps[part] if len(steps) > 1 else steps
        rounded = torch.round(rows / step).clamp_(-127, 127)
        approx = rounded * step
        codes[part] = rounded.to(torch.int8).numpy()
        miss = torch.linalg.vector_norm(rows - approx, dim=1).double() * widen
        size = torch.linalg.vector_norm(rows, dim=1).double() * widen
        entry_slack = 2 * F32_ROUNDOFF * (size + step[:, 0].double() * d**0.5)
        errors[part] = (miss + entry_slack).numpy()
        norms[part] = (torch.linalg.vector_norm(approx, dim=1).double() * widen * (1 + 2 * F32_ROUNDOFF)).numpy()
    return codes, errors, norms


def int8_scale(peaks: np.ndarray) -> np.ndarray:
    """The float32 step that maps each largest magnitude in `peaks` to about 127 (1 where it is 0)."""
    peaks = np.asarray(peaks, dtype=np.float64)
    step = np.maximum(peaks / 127, np.finfo(np.float32).tiny)
    return np.where(peaks > 0, step, 1.0).astype(np.float32)


def int8_codes(vectors: np.ndarray) -> Int8Codes:
    """The database side of the screen: one scale for every row, so scores compare as integers."""
    import torch

    peak = float(np.abs(vectors).max()) if vectors.size else 0.0
    if not np.isfinite(peak):  # no bound holds: the screen is never used
        return Int8Codes(torch.zeros((0, vectors.shape[1]), dtype=torch.int8), 1.0, float("inf"), float("inf"))
    scale = int8_scale(np.full((1, 1), peak))
    codes, errors, norms = int8_encode(vectors, scale)
    return Int8Codes(
        torch.from_numpy(codes), float(scale.item()), float(errors.max(initial=0.0)), float(norms.max(initial=0.0))
    )


def query_codes(queries: np.ndarray, screen: Int8Codes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales, margins): each query as int8 codes on its own scale, and a bound m
    on |q·x − s_q·s·(codes·codes)| that holds for every vector x behind `screen`:
    m = ‖q‖·max‖x − x̃‖ + ‖q − q̃‖·max‖x̃‖ (Cauchy–Schwarz on each side's rounding)."""
    scale = int8_scale(np.abs(queries).max(axis=1, keepdims=True))
    codes, errors, _ = int8_encode(queries, scale)
    margin = np.linalg.norm(queries.astype(np.float64), axis=1) * screen.max_error + errors * screen.max_norm
    return codes, scale[:, 0], margin * (1 + MARGIN_SLACK)


def _screen_block(scores, kk: int, kth, gap) -> tuple[np.ndarray, np.ndarray]:
    """(query, column) of the entries of one block of screen scores at or above each
    query's threshold kth − gap, after raising `kth` (in place) to this block's k-th
    largest score (or a lower bound of it: the k-th largest of a subset of its entries).

    Whole groups of `GROUP` columns are tested by their maxima first, so only the few
    groups that reach the threshold are compared entry by entry.
    """
    import torch

    nq, b = scores.shape
    groups = b // GROUP
    whole = torch.as_strided(scores, (nq, groups, GROUP), (scores.stride(0), GROUP, 1))
    maxima = whole.amax(dim=2) if groups else scores[:, :0]
    if groups >= kk:  # the k-th largest entry of the kk best groups: nearly always the block's own
        best = maxima.topk(kk, dim=1).indices
        entries = whole[torch.arange(nq)[:, None], best].reshape(nq, -1)
        torch.maximum(kth, entries.topk(kk, dim=1).values[:, -1], out=kth)
    elif b >= kk:
        torch.maximum(kth, scores.topk(kk, dim=1).values[:, -1], out=kth)
    threshold = kth - gap
    qi, gi = torch.nonzero(maxima >= threshold[:, None], as_tuple=True)
    ci, offset = torch.nonzero(whole[qi, gi] >= threshold[qi, None], as_tuple=True)
    tq, tr = torch.nonzero(scores[:, groups * GROUP :] >= threshold[:, None], as_tuple=True)
    return torch.cat([qi[ci], tq]).numpy(), torch.cat([gi[ci] * GROUP + offset, tr + groups * GROUP]).numpy()


def screened_topk(
    vectors: np.ndarray, screen: Int8Codes, queries: np.ndarray, k: int, ids: np.ndarray | None = None,
    score_bytes: int = SCORE_BLOCK_BYTES,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact top-k by an int8 screen and a float32 re-score; None when too many candidates
    survive, or for dimensions over `INT8_MAX_DIM`.

    Each query is rounded to int8 on its own scale s_q, the database is `screen` (scale s),
    and the screen's scores a = s_q·s·(codes·codes) are exact integer sums, within m of
    q·x for every vector (`query_codes`). A vector in the true top k scores at least s_k
    (the true k-th score), so at least s_k − m on the screen; and s_k ≥ t − m for any k-th
    largest screen score t seen so far. Every vector whose screen score is at least t − 2m
    is kept and re-scored in float32, so nothing of the top k is lost; t and 2m are
    compared in integer units.
    """
    import torch

    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    nq, n = len(queries), len(vectors)
    if queries.shape[1] > INT8_MAX_DIM:
        return None
    kk = min(k, n)
    q_codes, q_scale, margin = query_codes(queries, screen)
    # 2m in each query's integer score units, rounded up
    gap = torch.from_numpy(np.ceil(2 * margin / (q_scale * screen.scale)).astype(np.int64))
    q_codes = torch.from_numpy(q_codes)
    rows = block_rows(nq, n, score_bytes)
    if rows < n:  # every block but the last in whole groups
        rows = max(rows // GROUP * GROUP, GROUP, kk)
    kth = torch.full((nq,), torch.iinfo(torch.int64).min // 2)
    found_q: list[np.ndarray] = []
    found_r: list[np.ndarray] = []
    budget = MAX_CANDIDATE_SHARE * nq * n + nq * kk
    kept = 0
    for start in range(0, n, rows):
        scores = torch._int_mm(q_codes, screen.codes[start : start + rows].T)  # (nq, block rows) int32
        q, r = _screen_block(scores, kk, kth, gap)
        kept += len(r)
        if kept > budget:
            return None
        found_q.append(q)
        found_r.append(r + start)
    return rescore(vectors, queries, np.concatenate(found_q), np.concatenate(found_r), k, ids)


def rescore(
    vectors: np.ndarray, queries: np.ndarray, cand_q: np.ndarray, cand_r: np.ndarray, k: int, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) of each query among its candidates: rows `cand_r` of `vectors`
    for queries `cand_q`, scored in float32 by FAISS straight from the rows (no copies)."""
    nq = len(queries)
    order = np.argsort(cand_q, kind="stable")
    counts = np.bincount(cand_q, minlength=nq)
    slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    subset = np.full((nq, max(int(counts.max(initial=0)), 1)), -1, dtype=np.int64)
    subset[cand_q[order], slot] = cand_r[order]
    kk = min(k, subset.shape[1])
    scores = np.empty((nq, kk), dtype=np.float32)
    pos = np.empty((nq, kk), dtype=np.int64)
    faiss.knn_inner_products_by_idx(
        faiss.swig_ptr(queries), faiss.swig_ptr(vectors), faiss.swig_ptr(subset), queries.shape[1], nq,
        len(vectors), subset.shape[1], kk, faiss.swig_ptr(scores), faiss.swig_ptr(pos), subset.shape[1],
    )  # the row stride of `subset` is given: its default is the database size
    return padded(scores, pos, k, ids)  # queries with fewer than k candidates have -1 after their last


def padded(
    scores: np.ndarray, pos: np.ndarray, k: int, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(nq, k) results from (nq, kk ≤ k) search output: a missing hit (position -1, or a
    column past kk) gets score -inf and id -1; positions map through `ids` when given."""
    nq, kk = pos.shape
    found = pos >= 0
    out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
    out_ids = np.full((nq, k), -1, dtype=np.int64)
    out_scores[:, :kk] = np.where(found, scores, -np.inf)
    out_ids[:, :kk] = np.where(found, pos if ids is None else np.asarray(ids, dtype=np.int64)[np.maximum(pos, 0)], -1)
    return out_scores, out_ids


class ExactSearch:
    """Exact top-k over fixed vectors by FAISS flat, the blocked GEMM or the int8 screen,
    whichever this machine runs fastest for the batch (`indexer.path_choice`).

    Builds a transposed copy of the vectors for the blocked path the first time a batch of
    several queries takes it (single queries read the vectors as they are), int8 codes
    (a quarter of the size) the first time the screened path runs, and a FAISS flat copy
    unless an existing exact index is passed as `flat`.
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
        self._id_order: tuple[np.ndarray, np.ndarray] | None = None  # made when FAISS's ids need positions
        if flat is None:
            flat = faiss.IndexFlatIP(self.vectors.shape[1])
            if len(self.vectors):
                flat.add(self.vectors)
        self.flat = flat
        self._unscreened_s = 0.0  # time spent in searches before the codes were built
        self._fastest_s = float("inf")  # the quickest of those: about one scan of the vectors

    @property
    def columns(self) -> np.ndarray:
        """The vectors transposed, (d, n) C-contiguous, made on first use."""
        if self._columns is None:
            self._columns = np.ascontiguousarray(self.vectors.T)
        return self._columns

    @cached_property
    def codes(self) -> Int8Codes:
        """The vectors as int8 codes (a quarter of the bytes) for the screened path, made on first use."""
        with warnings.catch_warnings():  # memory-mapped vectors are read-only; this only reads them
            warnings.simplefilter("ignore", UserWarning)
            return int8_codes(self.vectors)

    def _screenable(self, queries: np.ndarray) -> bool:
        """The screen's error bound holds: finite queries and vectors, something to search."""
        return bool(len(queries) and len(self.vectors) and np.isfinite(queries).all() and np.isfinite(self.codes.max_error))

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return len(self.vectors)

    def _shape(self, n_queries: int, k: int) -> tuple[int, int, int, int]:
        """What a table is kept for: powers of two of n, k and the batch size, and the dimension."""
        return len(self.vectors).bit_length(), self.dim, k.bit_length(), max(n_queries, 1).bit_length()

    def table(self, n_queries: int, k: int) -> PathTable:
        """The timings (this process's, this machine's) that choose the path for such a batch."""
        return table_for(self._shape(n_queries, k))

    def paths(self, n_queries: int) -> list[Path]:
        """The paths a batch may take, the first to try first. The screen joins once its codes
        exist or pay for themselves (see `CODES_BUILD_SCANS`); one-thread variants where the
        libraries have several threads."""
        methods = ["blocked", "faiss"]
        if n_queries > 1 or self._codes_pay():
            methods.insert(1, "screened")
        parallel = [Path(m) for m in methods]
        if parallel_threads() > 1:
            return parallel + [Path(m, serial=True) for m in methods]
        return parallel

    def path_for(self, n_queries: int, k: int = 10) -> Path | None:
        """The path the timings choose for such a batch (None until each has been timed)."""
        paths = self.paths(n_queries)
        table = self.table(n_queries, k)
        return table.best(paths) if table.settled(paths) else None

    def search(
        self, queries: np.ndarray, k: int, method: Method | Path | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), best first; missing hits have id -1 and score -inf.

        `method` forces a path (a method name runs on all threads); by default the timings
        choose, and a batch of `EXPLORE_FROM` queries or more whose choice is still open
        times each open path on a slice of its own queries.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if method is not None:
            path = method if isinstance(method, Path) else Path(method)
            if path.method not in METHODS:
                raise ValueError(f"unknown exact-search method {path.method!r}; use one of {METHODS}")
            return self._run(path, queries, k)
        nq = len(queries)
        paths, table = self.paths(nq), self.table(nq, k)
        if not table.settled(paths):  # try first what won at the nearest batch size
            first = nearest_best(self._shape(nq, k), paths)
            paths = sorted(paths, key=lambda p: p != first)
        if nq < EXPLORE_FROM or table.settled(paths):
            return self._run(table.next_path(paths), queries, k, table)
        size = max(nq // EXPLORE_SLICES, EXPLORE_MIN_SLICE)
        parts, start = [], 0
        while start < nq:
            path = table.next_path(paths)
            stop = start + size if not table.settled(paths) and nq - start >= 2 * size else nq
            parts.append(self._run(path, queries[start:stop], k, table))
            start = stop
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _run(
        self, path: Path, queries: np.ndarray, k: int, table: PathTable | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search by `path`, timing it into `table`; the copies a path needs are made before the clock starts."""
        _ = self.codes if path.method == "screened" else self.columns if path.method == "blocked" and len(queries) > 1 else None
        unscreened = "codes" not in self.__dict__
        start = time.perf_counter()
        with threads_for(path):
            method = {"screened": self._screened, "blocked": self._blocked, "faiss": self._faiss}[path.method]
            found = self._final(queries, method(queries, k + TIE_EXTRA), k)
        spent = time.perf_counter() - start
        if table is not None and len(queries):
            table.record(path, spent / len(queries))
        if unscreened:
            self._unscreened_s += spent
            self._fastest_s = min(self._fastest_s, spent)
        return found

    def _final(self, queries: np.ndarray, pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top k of a path's best positions (each row best first, -1 after its last),
        re-scored by one routine (FAISS's, from the rows) and ordered by (score, id): every
        path returns the same scores, order and tie-breaks."""
        nq, width = pos.shape
        pos = np.ascontiguousarray(pos, dtype=np.int64)
        scores = np.empty((nq, width), dtype=np.float32)
        ranked = np.empty((nq, width), dtype=np.int64)
        if nq and len(self.vectors):
            faiss.knn_inner_products_by_idx(
                faiss.swig_ptr(queries), faiss.swig_ptr(self.vectors), faiss.swig_ptr(pos), self.dim, nq,
                len(self.vectors), width, width, faiss.swig_ptr(scores), faiss.swig_ptr(ranked), width,
            )
        else:
            ranked[:] = -1
        found = ranked >= 0
        ids = np.where(found, ranked if self.ids is None else self.ids[np.maximum(ranked, 0)], np.iinfo(np.int64).max)
        scores = np.where(found, scores, -np.inf)
        order = np.lexsort((ids, -scores), axis=-1)[:, :k]
        ids, scores = np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)
        missing = ids == np.iinfo(np.int64).max
        return padded(np.where(missing, -np.inf, scores), np.where(missing, -1, ids), k)

    def _codes_pay(self) -> bool:
        """The int8 codes exist, or searches without them have cost about as much as building them."""
        return "codes" in self.__dict__ or self._unscreened_s >= CODES_BUILD_SCANS * self._fastest_s

    def _faiss(self, queries: np.ndarray, k: int) -> np.ndarray:
        """FAISS IndexFlatIP itself; (nq, k) positions, best first."""
        kk = min(k, len(self.vectors))
        if kk == 0 or len(queries) == 0:
            return np.full((len(queries), k), -1, dtype=np.int64)
        scores, pos = self.flat.search(queries, kk)
        return padded(scores, self._positions(pos) if self._flat_gives_ids else pos, k)[1]

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions in `vectors` of ids (-1 stays -1)."""
        if self._id_order is None:
            order = np.argsort(self.ids, kind="stable")
            self._id_order = order, self.ids[order]
        order, ordered = self._id_order
        at = np.minimum(np.searchsorted(ordered, ids), len(order) - 1)
        return np.where(ids >= 0, order[at], -1)

    def _blocked(self, queries: np.ndarray, k: int) -> np.ndarray:
        """The blocked path, `BLOCKED_MAX_QUERIES` queries at a time; (nq, k) positions, best first."""
        if len(queries) == 1:  # one query reads `vectors` row-major
            return blocked_topk(self.vectors.T, queries, k, vectors=self.vectors)[1]
        return _in_chunks(lambda chunk: blocked_topk(self.columns, chunk, k)[1], queries, BLOCKED_MAX_QUERIES)

    def _screened(self, queries: np.ndarray, k: int) -> np.ndarray:
        """The int8 screen, `SCREEN_MAX_QUERIES` queries at a time; what it cannot serve
        (non-finite values, clusters of near-copies) goes to the blocked path. (nq, k) positions."""
        if not self._screenable(queries):
            return self._blocked(queries, k)

        def chunk_topk(chunk: np.ndarray) -> np.ndarray:
            found = screened_topk(self.vectors, self.codes, chunk, k)
            return found[1] if found is not None else self._blocked(chunk, k)

        return _in_chunks(chunk_topk, queries, SCREEN_MAX_QUERIES)


def _in_chunks(topk: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, size: int) -> np.ndarray:
    """`topk` over `queries` `size` at a time, results stacked."""
    return np.concatenate([topk(queries[start : start + size]) for start in range(0, len(queries), size)])
