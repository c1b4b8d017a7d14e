"""What every benchmark shares: the machine description, timers, memory, and writing results.

Each benchmark returns one JSON-ready dict; `save` writes it as NAME.json beside the
plot NAME.png in the output folder: ./seesay-bench/ unless --out names another (the
project's own committed figures live in benchmarks/results/, written with --out).
"""
from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from retrieval.datasets import SHARED_FLICKR8K

DEFAULT_OUT = Path("seesay-bench")
# The shared data set beside the project's root (see ../shared/README.md).
FLICKR = SHARED_FLICKR8K


def machine() -> dict[str, Any]:
    """nproc, CPU model, memory, library versions and the time: where a figure came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    for module in ("torch", "faiss"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # not installed or broken: leave it out
            pass
    return info


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Fewest seconds `fn` took over `repeats` calls (the figure least disturbed by other load)."""
    best = float("inf")
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def latencies_ms(fn: Callable[[Any], Any], inputs: list) -> np.ndarray:
    """Milliseconds of `fn(x)` for each input, one call at a time."""
    out = np.empty(len(inputs))
    for i, x in enumerate(inputs):
        start = time.perf_counter()
        fn(x)
        out[i] = (time.perf_counter() - start) * 1e3
    return out


def percentiles(ms: np.ndarray) -> dict[str, float]:
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(np.mean(ms)),
        "n": int(len(ms)),
    }


def save(payload: dict[str, Any], out_dir: str | Path, name: str) -> Path:
    """Write payload as NAME.json under out_dir (created); return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def figure(ncols: int = 1, width: float = 7.0):
    """A fresh matplotlib figure and axes on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, 4.5), dpi=110)


def save_plot(fig, out_dir: str | Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
