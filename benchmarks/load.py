"""Load on `seesay serve`: text-search throughput and latency under concurrency, and beside hostile uploads.

The server runs in a second process on 127.0.0.1 (`python -m cli.app serve`); this process
drives it with one thread per concurrent client, each on its own keep-alive connection,
sending text searches (`GET /api/search/text`, distinct captions in turn) back to back.
Every phase is bounded by a duration and a request count. Phases:

- concurrency 1, 8 and 32: requests/s, p50 and p99 latency (client-side, whole request);
- concurrency 8 while another client keeps a 20000x1 PNG upload in flight (the issue-11
  reproduction: a 140-byte file that once became a billion-pixel tensor under a lock);
- concurrency 8 while another client keeps uploading a legitimate 6-megapixel JPEG.

Targets (issue 11, 2 cores): throughput at 8 ≥ 1.6× the rate at 1; p99 at 8 ≤ 3× its
p50; with the hostile upload in flight, the searches' p99 ≤ 2× their p50.

    python -m benchmarks.load [--index DIR] [--duration 10] [--json]

Without --index, a small index of generated shapes is built with the default encoder
(the text query's cost is the encoder's; search over a few items adds little).
"""
from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import logging
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.report import FLICKR, machine, percentiles

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
log = logging.getLogger(__name__)
FALLBACK_QUERIES = [
    "a dog runs through the snow",
    "a man in a red shirt rides a bike",
    "two children play near the water",
    "a girl jumps into a swimming pool",
    "a brown dog carries a stick on the beach",
    "people walk down a busy city street",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def queries(n: int = 500) -> list[str]:
    """Distinct captions to search for: Flickr8k's when present, else fixed phrases."""
    path = FLICKR / "captions.csv"
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as f:
            found = [row["caption"] for row, _ in zip(csv.DictReader(f), range(n))]
        if found:
            return found
    return FALLBACK_QUERIES


def build_index(workdir: Path, encoder: str) -> Path:
    """A small index of generated shapes, made by the CLI like a user would."""
    from retrieval.demo_data import make_shape_set

    data = make_shape_set(workdir / "data", copies=2)
    index = workdir / "index"
    log.info(f"building an index of {data} with encoder {encoder} ...")
    subprocess.run(
        [sys.executable, "-m", "cli.app", "index", "--data", str(data), "--index", str(index), "--encoder", encoder, "--json"],
        cwd=ROOT, check=True, capture_output=True, timeout=900,
    )
    return index


class Server:
    """`seesay serve` in a subprocess on a free loopback port; stopped on exit."""

    def __init__(self, index: Path, log_path: Path) -> None:
        self.port = free_port()
        self.log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli.app", "serve", "--index", str(index), "--host", HOST,
             "--port", str(self.port), "--log-level", "warning", "--no-disk-cache"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"seesay serve exited with {self.process.returncode}; see {self.log.name}")
            try:
                connection = http.client.HTTPConnection(HOST, self.port, timeout=5)
                connection.request("GET", "/api/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"seesay serve did not answer within {timeout_s}s; see {self.log.name}")

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def multipart(name: str, data: bytes, mime: str) -> tuple[bytes, str]:
    boundary = "seesay-load-boundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
        f"Content-Type: {mime}\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n5\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def strip_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20000, 1)).save(buffer, "PNG")
    return buffer.getvalue()


def photo_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((3000, 2000), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def searcher(port: int, texts: list[str], start: int, stop: threading.Event, deadline: float,
             budget: list[int], lock: threading.Lock, out: list[float], errors: list[str]) -> None:
    """One client: text searches back to back until stopped, out of time, or out of the shared budget."""
    connection = http.client.HTTPConnection(HOST, port, timeout=120)
    i = start
    while not stop.is_set() and time.monotonic() < deadline:
        with lock:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        url = "/api/search/text?" + urllib.parse.urlencode({"q": texts[i % len(texts)], "k": 10})
        i += 1
        began = time.perf_counter()
        try:
            connection.request("GET", url)
            response = connection.getresponse()
            response.read()
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            connection = http.client.HTTPConnection(HOST, port, timeout=120)
            continue
        elapsed = (time.perf_counter() - began) * 1e3
        if response.status != 200:
            errors.append(f"HTTP {response.status}")
        else:
            out.append(elapsed)


def uploader(port: int, body: bytes, content_type: str, stop: threading.Event, statuses: list[int], ms: list[float]) -> None:
    """One client keeping an upload in flight, again and again, until stopped."""
    connection = http.client.HTTPConnection(HOST, port, timeout=300)
    while not stop.is_set():
        began = time.perf_counter()
        try:
            connection.request("POST", "/api/search/image", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
        except OSError:
            connection = http.client.HTTPConnection(HOST, port, timeout=300)
            continue
        statuses.append(response.status)
        ms.append((time.perf_counter() - began) * 1e3)


def phase(port: int, concurrency: int, texts: list[str], duration_s: float, max_requests: int,
          upload: tuple[bytes, str] | None = None) -> dict[str, Any]:
    """Run `concurrency` searching clients (plus an uploading one) for a bounded time; their figures."""
    stop, lock = threading.Event(), threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    budget = [max_requests]
    statuses: list[int] = []
    upload_ms: list[float] = []
    extra = []
    if upload is not None:
        extra.append(threading.Thread(target=uploader, args=(port, *upload, stop, statuses, upload_ms)))
        extra[0].start()
        time.sleep(0.2)  # let the first upload get going
    began = time.perf_counter()
    deadline = time.monotonic() + duration_s
    threads = [
        threading.Thread(target=searcher, args=(port, texts, 97 * n, stop, deadline, budget, lock, latencies, errors))
        for n in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    stop.set()
    for thread in extra:
        thread.join(120)
    result: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "error_kinds": sorted(set(errors))[:5],
        "seconds": round(wall, 2),
        "rps": round(len(latencies) / wall, 2),
        **{k: round(v, 1) if isinstance(v, float) else v for k, v in percentiles(np.asarray(latencies or [np.nan])).items()},
    }
    if upload is not None:
        result["uploads"] = len(statuses)
        result["upload_statuses"] = sorted(set(statuses))
        result["upload_p50_ms"] = round(float(np.median(upload_ms)), 1) if upload_ms else None
    return result


def run(index: Path | None, encoder: str, duration_s: float, max_requests: int) -> dict[str, Any]:
    texts = queries()
    with tempfile.TemporaryDirectory(prefix="seesay-load-") as tmp:
        work = Path(tmp)
        index = index or build_index(work, encoder)
        with Server(index, work / "server.log") as server:
            log.info(f"starting seesay serve on {HOST}:{server.port} ...")
            server.wait()
            log.info("warming up ...")
            phase(server.port, 2, texts, 5, 40)
            phases: dict[str, dict[str, Any]] = {}
            for concurrency in (1, 8, 32):
                log.info(f"concurrency {concurrency} ...")
                phases[f"c{concurrency}"] = phase(server.port, concurrency, texts, duration_s, max_requests)
            log.info("concurrency 8 with a 20000x1 PNG upload in flight ...")
            phases["c8_strip_upload"] = phase(server.port, 8, texts, duration_s, max_requests, multipart("strip.png", strip_png(), "image/png"))
            log.info("concurrency 8 with a 6-megapixel JPEG upload in flight ...")
            phases["c8_photo_upload"] = phase(server.port, 8, texts, duration_s, max_requests, multipart("photo.jpg", photo_jpeg(), "image/jpeg"))
    c1, c8, hostile = phases["c1"], phases["c8"], phases["c8_strip_upload"]
    checks = {
        "throughput_c8_over_c1": round(c8["rps"] / c1["rps"], 2),
        "p99_over_p50_c8": round(c8["p99_ms"] / c8["p50_ms"], 2),
        "p99_over_p50_with_strip_upload": round(hostile["p99_ms"] / hostile["p50_ms"], 2),
        "p99_with_strip_upload_over_p50_c8": round(hostile["p99_ms"] / c8["p50_ms"], 2),
    }
    targets = {
        "throughput_c8_over_c1 >= 1.6": checks["throughput_c8_over_c1"] >= 1.6,
        "p99_over_p50_c8 <= 3": checks["p99_over_p50_c8"] <= 3,
        "p99_over_p50_with_strip_upload <= 2": checks["p99_over_p50_with_strip_upload"] <= 2,
    }
    return {"machine": machine(), "index": str(index) if index else "generated shapes", "encoder": encoder,
            "phases": phases, "ratios": checks, "targets_met": targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, help="An existing index to serve (default: build a small one).")
    parser.add_argument("--encoder", default="default", help="Encoder for the generated index.")
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds per phase (at most).")
    parser.add_argument("--max-requests", type=int, default=3000, help="Requests per phase (at most).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, format="%(message)s")  # progress, on stderr
    result = run(args.index, args.encoder, args.duration, args.max_requests)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"load on seesay serve ({result['machine']['nproc']} cores, load average {result['machine'].get('load_average_1min')})")
    print(f"{'phase':<18}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'n':>7}{'errors':>8}  uploads")
    for name, p in result["phases"].items():
        uploads = f"{p['uploads']} x {p['upload_statuses']} p50 {p['upload_p50_ms']} ms" if "uploads" in p else ""
        print(f"{name:<18}{p['rps']:>8}{p['p50_ms']:>9}{p['p99_ms']:>9}{p['requests']:>7}{p['errors']:>8}  {uploads}")
    for name, value in result["ratios"].items():
        print(f"{name}: {value}")
    for name, met in result["targets_met"].items():
        print(f"target {name}: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
