"""Which exact-search path serves a batch: timed on the searches themselves, remembered per machine and shape.

A path is a method (FAISS flat, the blocked GEMM, the int8 screen) run on all the
threads the libraries are set to, or on one. On a 2-core machine shared with other
busy processes, one thread ran every method 1.5–5× faster than two (measured at
100k × 512, load 6–11: each parallel region waits at its barrier for a thread the
scheduler took away, and the screen has a dozen such regions per block); on an idle
machine two threads win. So the thread count is measured like the method, never assumed.

`PathTable` holds, for one (machine, shape, batch-size bucket), the seconds per query
each path took. Until each available path has `SAMPLES` times (or one time that is
already `PRUNE`× the best), a search runs the next untimed path; then the fastest by the
best of its last `SAMPLES` times serves, its own times refreshing on every call, so a
path that turns slow on the calls it serves gives way. Every `RECHECK_CALLS` calls
the runner-up's times are dropped, so it is timed again on the next calls and a change
of load can move the choice. Tables live per process (`table_for`), keyed by
`machine_key()`: a change of thread settings or usable CPUs starts a fresh table.
"""
from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType
from typing import Iterator, Sequence

# Times per path before a choice; the best of them counts (load only ever adds time).
SAMPLES = 2
# A path whose first time is this many times the best known is not timed a second time.
PRUNE = 1.5
# Calls between re-timings of the runner-up (one or two slower calls in this many).
RECHECK_CALLS = 200


@dataclass(frozen=True)
class Path:
    """A method and whether it runs on one thread (`serial`) or on all the libraries' threads."""

    method: str
    serial: bool = False

    def __str__(self) -> str:
        return f"{self.method}/1" if self.serial else self.method


@dataclass
class PathTable:
    """Seconds per query of each path on one bucket of batch sizes, and the choice they make."""

    times: dict[Path, list[float]] = field(default_factory=dict)
    calls: int = 0

    def figure(self, path: Path) -> float:
        """A path's time: the best of its last `SAMPLES`, the only ones kept (so a path that has turned slow
        under the calls it serves loses its place after `SAMPLES` of them)."""
        return min(self.times[path])

    def best(self, available: Sequence[Path]) -> Path | None:
        """The timed path with the lowest figure, among `available`."""
        timed = [p for p in available if self.times.get(p)]
        return min(timed, key=self.figure, default=None)

    def untimed(self, available: Sequence[Path]) -> list[Path]:
        """Paths still to time, in the order given: fewer than `SAMPLES` times, unless
        their first is already `PRUNE`× the best."""
        best = self.best(available)
        floor = self.figure(best) if best is not None else float("inf")
        return [
            p for p in available
            if len(self.times.get(p, ())) < SAMPLES and not min(self.times.get(p, [0.0])) >= PRUNE * floor
        ]

    def settled(self, available: Sequence[Path]) -> bool:
        return not self.untimed(available)

    def next_path(self, available: Sequence[Path]) -> Path:
        """The path the next call takes: the first untimed one, else the fastest (or, every
        `RECHECK_CALLS` calls, the runner-up, whose old times are dropped)."""
        todo = self.untimed(available)
        if todo:
            return todo[0]
        best = self.best(available)
        assert best is not None
        self.calls += 1
        if self.calls >= RECHECK_CALLS:
            self.calls = 0
            others = [p for p in available if p != best]
            runner_up = min(others, key=self.figure, default=None)
            if runner_up is not None:
                del self.times[runner_up]
                return runner_up
        return best

    def record(self, path: Path, seconds_per_query: float) -> None:
        kept = self.times.setdefault(path, [])
        kept.append(seconds_per_query)
        del kept[:-SAMPLES]

    def summary(self) -> dict[str, float]:
        """{path: best seconds per query} for reports."""
        return {str(p): self.figure(p) for p, t in self.times.items() if t}


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        return ""


def machine_key() -> tuple:
    """What the choice depends on besides the shape: CPU, usable cores and every thread setting.
    Cheap enough to read on each search (a few microseconds)."""
    import faiss

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    env = tuple(os.environ.get(v, "") for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"))
    return cpu_model(), cores, _serial.torch_threads_configured(), faiss.omp_get_max_threads(), env


_TABLES: dict[tuple, PathTable] = {}


def table_for(shape_key: tuple, machine: tuple | None = None) -> PathTable:
    """This process's table for a shape on this machine (a new one after the machine key changes)."""
    key = (machine if machine is not None else machine_key(), *shape_key)
    if key not in _TABLES:
        _TABLES[key] = PathTable()
    return _TABLES[key]


def nearest_best(shape_key: tuple, available: Sequence[Path]) -> Path | None:
    """The fastest of `available` in the nearest batch-size bucket already timed (the last
    element of `shape_key` is the bucket): the path to try first in a new bucket."""
    machine, bucket = machine_key(), shape_key[-1]
    for other in sorted(range(1, 40), key=lambda b: abs(b - bucket)):
        table = _TABLES.get((machine, *shape_key[:-1], other))
        best = table.best(available) if table is not None else None
        if best is not None:
            return best
    return None


def forget_tables() -> None:
    """Drop every table of this process (tests; or after a change the key cannot see)."""
    _TABLES.clear()


@lru_cache(maxsize=1)
def _blas_pools():
    """numpy's and FAISS's BLAS thread pools (found once: ~15 ms, paid only when a serial path first runs)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def _loaded_torch() -> ModuleType | None:
    """The torch module if an import of it has finished, else None.

    Python lists a module in `sys.modules` as its import starts: while another thread (a
    server's request loading an encoder) is still importing torch, the module found there
    lacks most of its names, `get_num_threads` among them.
    """
    torch = sys.modules.get("torch")
    if torch is None or getattr(getattr(torch, "__spec__", None), "_initializing", False):
        return None
    return torch


class _SerialMode:
    """torch's and the BLAS libraries' thread counts are process-wide: the first serial
    search to start sets them to 1 and the last to finish restores them, so searches in
    parallel threads (the server's) neither undo each other's setting nor leave it behind.
    torch is only touched once something has imported it (the storage engine does not need it),
    and only once that import has finished (`_loaded_torch`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.torch_threads: int | None = None
        self.blas_limit = None

    def torch_threads_configured(self) -> int:
        """torch's thread count as set outside serial searches (0 while torch is not loaded)."""
        torch = _loaded_torch()
        with self.lock:
            if self.users and self.torch_threads is not None:
                return self.torch_threads
            return torch.get_num_threads() if torch is not None else 0

    @contextmanager
    def __call__(self, with_torch: bool) -> Iterator[None]:
        """One thread for the body; `with_torch`: the body uses torch (load it now to limit it)."""
        import faiss

        if with_torch:
            import torch  # noqa: F401
        with self.lock:
            if not self.users:
                self.blas_limit = _blas_pools().limit(limits=1)
            torch = _loaded_torch()
            if torch is not None and self.torch_threads is None:
                self.torch_threads = torch.get_num_threads()
                torch.set_num_threads(1)
            self.users += 1
        faiss_threads = faiss.omp_get_max_threads()  # FAISS's OpenMP setting is this thread's own
        faiss.omp_set_num_threads(1)
        try:
            yield
        finally:
            faiss.omp_set_num_threads(faiss_threads)
            with self.lock:
                self.users -= 1
                if not self.users:
                    self.blas_limit.restore_original_limits()
                    if self.torch_threads is not None:
                        sys.modules["torch"].set_num_threads(self.torch_threads)
                        self.torch_threads = None


_serial = _SerialMode()


def parallel_threads() -> int:
    """The most threads a path runs on here (torch's or FAISS's setting, outside serial searches)."""
    import faiss

    return max(_serial.torch_threads_configured(), faiss.omp_get_max_threads())


@contextmanager
def threads_for(path: Path) -> Iterator[None]:
    """Run the body on one thread when `path` is serial: torch's pool, FAISS's OpenMP and
    the BLAS libraries; restored afterwards."""
    if not path.serial:
        yield
        return
    with _serial(with_torch=path.method == "screened"):
        yield
