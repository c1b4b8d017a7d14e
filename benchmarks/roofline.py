"""The machine's ceilings for flat search, measured in the same run: read bandwidth and sgemm rate.

Flat search of nq queries over n d-dimensional float32 vectors must at least read the
vectors once (4·n·d bytes) and do 2·nq·n·d FLOPs, so its time is bounded below by
max(bytes / read bandwidth, FLOPs / sgemm rate). Both rates are measured with numpy's
BLAS on the threads it is allowed (the same count FAISS's OpenMP uses here) and on one
thread, taking the best of a few repeats and of the two: a ceiling, not an average. (On a
machine whose cores other processes keep busy, one thread can beat all of them, and
seesay's exact search may run on one; a bound measured on all threads only would then
be too slow a ceiling.)
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Roofline:
    read_bytes_per_s: float
    sgemm_flops_per_s: float
    threads: int
    # the same rates on one thread (the ceilings above are the better of the two)
    serial_read_bytes_per_s: float | None = None
    serial_sgemm_flops_per_s: float | None = None

    def bound_s(self, n_queries: int, n: int, d: int, bytes_per_value: float = 4.0) -> float:
        """Lower bound on one flat search of `n_queries` over n×d float32 vectors (or, with
        `bytes_per_value`, over a copy of them in another format: 1 for int8 codes)."""
        read = bytes_per_value * n * d / self.read_bytes_per_s
        compute = 2.0 * n_queries * n * d / self.sgemm_flops_per_s
        return max(read, compute)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["read_gb_per_s"] = self.read_bytes_per_s / 1e9
        out["sgemm_gflops"] = self.sgemm_flops_per_s / 1e9
        return out


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(mib: int = 512, d: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a matrix-vector product over a `mib` MiB float32 matrix (far beyond cache)."""
    rows = (mib << 20) // (4 * d)
    a = np.random.default_rng(0).standard_normal((rows, d), dtype=np.float32)
    x = np.ones(d, dtype=np.float32)
    out = np.empty(rows, dtype=np.float32)
    np.dot(a, x, out=out)  # touch pages and warm the BLAS threads
    seconds = _best(lambda: np.dot(a, x, out=out), repeats)
    return a.nbytes / seconds


def sgemm_rate(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a size×size float32 matrix product."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), dtype=np.float32)
    np.matmul(a, b, out=out)
    seconds = _best(lambda: np.matmul(a, b, out=out), repeats)
    return 2.0 * size**3 / seconds


def blas_threads() -> int:
    try:
        from threadpoolctl import threadpool_info

        counts = [p.get("num_threads", 1) for p in threadpool_info() if p.get("user_api") == "blas"]
        if counts:
            return int(max(counts))
    except Exception:  # threadpoolctl missing or confused: fall back on FAISS's count
        pass
    import faiss

    return int(faiss.omp_get_max_threads())


def measure(quick: bool = False) -> Roofline:
    """Measure both ceilings now, on all threads and on one (smaller buffers and fewer
    repeats when `quick`)."""
    from threadpoolctl import threadpool_limits

    def rates() -> tuple[float, float]:
        return (read_bandwidth(256 if quick else 512, repeats=3 if quick else 5),
                sgemm_rate(1536 if quick else 2048, repeats=3 if quick else 5))

    read, sgemm = rates()
    with threadpool_limits(limits=1, user_api="blas"):
        serial_read, serial_sgemm = rates()
    return Roofline(max(read, serial_read), max(sgemm, serial_sgemm), blas_threads(), serial_read, serial_sgemm)
