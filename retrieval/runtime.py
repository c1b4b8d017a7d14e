"""Where the torch models run: the device (a GPU when there is one), its precision, its loader workers.

`SEESAY_DEVICE` (e.g. `cpu`, `cuda`, `cuda:1`) overrides the choice. On a CUDA device the
encoders run under bfloat16 autocast and batches travel from pinned memory; on the CPU they
run in float32.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from typing import ContextManager, Iterator

import torch

DEVICE_ENV = "SEESAY_DEVICE"


def default_device() -> torch.device:
    """`$SEESAY_DEVICE` if set, else the first CUDA GPU if there is one, else the CPU."""
    chosen = os.environ.get(DEVICE_ENV)
    if chosen:
        device = torch.device(chosen)
        if device.type == "cuda" and not torch.cuda.is_available():
            from retrieval.errors import SeesayError

            raise SeesayError(f"{DEVICE_ENV}={chosen} but torch sees no CUDA GPU")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> ContextManager:
    """bfloat16 autocast on a CUDA device; nothing (float32) on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


QUERY_PRECISION_ENV = "SEESAY_QUERY_PRECISION"


def cpu_query_dtype() -> torch.dtype:
    """The precision of a text query's transformer layers on the CPU: bfloat16 where the CPU multiplies it natively.

    One query is a few tokens, and most of its time is the text tower's linears (MPNet: 340 MB
    of float32 weights); in bfloat16 they read half the bytes and run at twice the rate (default
    model: Flickr8k dev text→image R@1 unchanged, cosine to the float32 rows 0.99995;
    benchmarks/RESULTS.md). Without AVX512-BF16 or AMX, bfloat16 is emulated and slower, so
    float32 stays. `SEESAY_QUERY_PRECISION=float32|bfloat16` decides instead.
    """
    chosen = os.environ.get(QUERY_PRECISION_ENV, "").strip().lower()
    if chosen in ("float32", "bfloat16"):
        return getattr(torch, chosen)
    if chosen:
        from retrieval.errors import SeesayError

        raise SeesayError(f"{QUERY_PRECISION_ENV}={chosen!r}: use float32 or bfloat16")
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    native = capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")
    return torch.bfloat16 if native else torch.float32


def query_threads() -> int:
    """Threads for one text query: torch's, fewer when other processes are running on the cores right now.

    A query is some 500 small parallel ops; each waits for all its threads, so a thread that
    other work has pushed off its core stalls every op. Measured on 2 cores with other work
    running (load 5.7): 2 threads p50 68 ms, p90 323; 1 thread 47 and 62. On an idle machine 2
    threads are faster. Decided per query from the kernel's count of runnable tasks, a snapshot
    rather than an average, less this process's own (its thread pools may still be spinning
    after the last search); where /proc is missing, torch's count.
    """
    threads = torch.get_num_threads()
    others = other_running_tasks()
    if others is None:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(threads, cores - others))


def other_running_tasks() -> int | None:
    """Tasks of other processes running or ready to run now (from /proc), or None where unknown."""
    try:
        with open("/proc/loadavg") as handle:
            running = int(handle.read().split()[3].split("/")[0])
        if running <= 1:  # only the thread reading this: no need to read this process's threads
            return 0
        return max(0, running - own_running_threads())
    except (OSError, ValueError, IndexError):
        return None


def own_running_threads() -> int:
    """This process's threads that are running or ready to run (state R in /proc/self/task/*/stat)."""
    own = 0
    for task in os.scandir("/proc/self/task"):
        with open(os.path.join(task.path, "stat")) as handle:
            own += handle.read().rpartition(")")[2].split()[0] == "R"
    return own


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block, restored after it."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


def loader_workers(device: torch.device) -> int:
    """Decode/preprocess worker processes to keep `device` fed.

    A GPU outruns one core's JPEG decoding many times over, so it gets a worker per core (at
    most 16; the main process mostly waits on the GPU); on the CPU the model needs the cores
    itself, and two workers hide decoding.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    if device.type == "cuda":
        return max(1, min(16, cores))
    return min(2, max(1, cores))


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Stop glibc from handing large freed blocks back to the kernel between batches (once per process).

    A CPU forward allocates activations of tens of MB per batch. glibc serves blocks above its
    mmap threshold (at most 32 MB by default) with fresh mmap()s and unmaps them on free, so every
    batch page-faults its memory anew: measured on EfficientNet-Lite0 at batch 32, system time was
    0.4× user time (1.47M minor faults in 3 batches); with these settings 0.01× and 28k faults, for
    the same user time. The cost is that the process keeps its peak heap. Settings already given as
    MALLOC_*_ environment variables win; `SEESAY_MALLOC_TUNING=0` turns this off; no-op off glibc.
    Returns whether the settings were applied.
    """
    if os.environ.get("SEESAY_MALLOC_TUNING", "1") == "0" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31)
                and libc.mallopt(m_top_pad, 1 << 28))
