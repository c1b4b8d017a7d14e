"""`seesay bench encode`: images/s and captions/s through the real pipeline vs the bare model.

For each encoder, on the same Flickr8k dev images:
- `engine`: `retrieval.embedding.encode_image_files` (what `seesay index` and `seesay eval`
  run, skipping and reporting bad files): decode and preprocess in worker processes a few
  batches ahead, the model on the preprocessed tensors;
- `loader`: `encoder.encode_images(paths)`, the same worker pipeline behind the encoder's
  own interface (a bad file raises);
- `bare`: the model's forward alone on batches decoded beforehand into what the workers
  send (uint8 pixels; scaling and normalisation stay in the forward, on the device);
- `decode-only`: the workers alone, no model: the most the pipeline could deliver.
`pipeline_efficiency` = engine images/s ÷ bare images/s (1.0 = decoding fully hidden);
`loader_efficiency` is the same for the encoder's own path. Captions/s is
`retrieval.embedding.encode_captions` (tokenise + model). Every figure is on the encoder's
device (`retrieval.runtime`): a GPU when there is one, in bfloat16 autocast, where an
open_clip ViT-B-32 with random weights is added (`openclip-random:ViT-B-32` names it on any
machine). With `--n` above the 1,000 dev images, the images are cycled (each one still
decoded every time).
"""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.report import FLICKR, figure, machine, save_plot
from retrieval import runtime
from retrieval.embedding import encode_captions, encode_image_files
from retrieval.encoders.base import Encoder
from retrieval.encoders.registry import load_encoder

NAME = "encode"
log = logging.getLogger(__name__)
DEFAULT_ENCODERS = ("default",)
# Registry kinds (retrieval.encoders.registry.KINDS). Same architecture and cost as `default`, untrained
# heads: measured when no other encoder loads.
FALLBACK = "towers-untrained"
RANDOM_OPENCLIP = "openclip-random:"


def flickr_sample(n_images: int, n_captions: int, data: Path = FLICKR) -> tuple[list[Path], list[str]]:
    """The first `n_images` dev images (cycled when there are fewer) and the first captions."""
    split = data / "splits" / "dev.txt"
    names = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    names = (names * -(-n_images // len(names)))[:n_images] if names else names
    with open(data / "captions.csv", newline="") as handle:
        captions = [row["caption"] for row in csv.DictReader(handle)]
    return [data / "images" / name for name in names[:n_images]], captions[:n_captions]


def bare_model(encoder: Encoder) -> tuple[Callable, Callable] | None:
    """(preprocess PIL → tensor as the decode workers do, forward tensor batch → vectors) for an
    encoder whose image side is one torch model (`TorchImageEncoder`); None for others (e.g. bag-of-words)."""
    if callable(getattr(encoder, "encode_image_tensors", None)):
        return encoder.worker_transform, encoder.encode_image_tensors
    return None


def bench_encoder(encoder: Encoder, paths: Sequence[Path], captions: Sequence[str], batch_size: int, repeats: int) -> dict[str, Any]:
    import torch

    from retrieval.images import load_rgb

    device = getattr(encoder, "device", torch.device("cpu"))
    out: dict[str, Any] = {"encoder": encoder.spec, "dim": encoder.dim, "batch_size": batch_size,
                           "n_images": len(paths), "n_distinct_images": len(set(paths)), "n_captions": len(captions),
                           "torch_threads": torch.get_num_threads(), "device": _device_name(device),
                           "precision": "bfloat16 autocast" if device.type == "cuda" else "float32"}
    # Warm up: first calls pay for lazy initialisation and allocator growth.
    encoder.encode_images(list(paths[: min(8, len(paths))]), batch_size)
    encoder.encode_texts(list(captions[:8]))

    def best(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    user0, sys0 = cpu_times()
    engine_s = best(lambda: encode_image_files(encoder, list(paths), batch_size))
    user1, sys1 = cpu_times()
    # CPU time of the engine passes (this process + its decode workers), per image: kernel time
    # here is mostly page faults (see retrieval.runtime.keep_freed_memory).
    out["engine_user_cpu_ms_per_image"] = 1000 * (user1 - user0) / (repeats * len(paths))
    out["engine_sys_cpu_ms_per_image"] = 1000 * (sys1 - sys0) / (repeats * len(paths))
    out["engine_sys_per_user"] = (sys1 - sys0) / max(user1 - user0, 1e-9)
    loader_s = best(lambda: encoder.encode_images(list(paths), batch_size))
    out["engine_images_per_s"] = len(paths) / engine_s
    out["loader_images_per_s"] = len(paths) / loader_s
    parts = bare_model(encoder)
    if parts is not None:
        transform, forward = parts
        tensors = torch.stack([transform(load_rgb(p)) for p in paths])
        batches = list(torch.split(tensors, batch_size))
        if device.type == "cuda":  # as the pipeline hands them over: page-locked, copied asynchronously
            batches = [b.pin_memory() for b in batches]
        bare_s = best(lambda: [forward(b) for b in batches])
        out["bare_images_per_s"] = len(paths) / bare_s
        start = time.perf_counter()
        for p in paths:
            transform(load_rgb(p))
        out["decode_preprocess_images_per_s_one_thread"] = len(paths) / (time.perf_counter() - start)
        # The decode workers alone, no model: the most the pipeline could deliver.
        out["decode_workers"] = runtime.loader_workers(device)
        out["decode_only_images_per_s"] = len(paths) / best(lambda: sum(len(x) for _, x, _ in encoder.image_tensor_batches(list(paths), batch_size)))
        out["pipeline_efficiency"] = out["engine_images_per_s"] / out["bare_images_per_s"]
        out["loader_efficiency"] = out["loader_images_per_s"] / out["bare_images_per_s"]
    else:
        out["bare_images_per_s"] = None
        out["pipeline_efficiency"] = None
        out["loader_efficiency"] = None
    captions_s = best(lambda: encode_captions(encoder, list(captions)))
    out["captions_per_s"] = len(captions) / captions_s
    return out


def cpu_times() -> tuple[float, float]:
    """(user, system) CPU seconds of this process and its finished children (the decode workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + children.ru_utime, own.ru_stime + children.ru_stime


def _device_name(device) -> str:
    import torch

    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def run(
    encoders: Sequence[str] = DEFAULT_ENCODERS,
    quick: bool = False,
    n_images: int | None = None,
    n_captions: int | None = None,
    batch_size: int = 32,
    data: Path = FLICKR,
) -> dict[str, Any]:
    """Benchmark each available encoder; unavailable ones are listed with the reason."""
    import torch

    n_images = n_images or (64 if quick else 384)
    n_captions = n_captions or (128 if quick else 2000)
    repeats = 1 if quick else 2
    paths, captions = flickr_sample(n_images, n_captions, data)
    specs = list(encoders)
    if torch.cuda.is_available() and not any(s.startswith(RANDOM_OPENCLIP) for s in specs):
        specs.append(RANDOM_OPENCLIP + "ViT-B-32")
    result: dict[str, Any] = {"benchmark": NAME, "quick": quick, "machine": machine(), "encoders": {}, "skipped": {}}
    for spec in specs + [FALLBACK]:
        if spec == FALLBACK and (result["encoders"] or FALLBACK in specs[:-1]):
            continue
        try:
            encoder = load_encoder(spec)
        except Exception as exc:  # not available here: say why and go on
            result["skipped"][spec] = f"{type(exc).__name__}: {exc}"
            log.info(f"skipping {spec}: {exc}")
            continue
        log.info(f"encoding {len(paths)} images and {len(captions)} captions with {spec}")
        result["encoders"][spec] = bench_encoder(encoder, paths, captions, batch_size, repeats)
    measured = [r for r in result["encoders"].values() if r.get("pipeline_efficiency") is not None]
    if measured:
        first = measured[0]
        result["pipeline_efficiency"] = first["pipeline_efficiency"]
        result["images_per_s"] = first["engine_images_per_s"]
        result["captions_per_s"] = first["captions_per_s"]
    return result


def plot(result: dict[str, Any], out_dir) -> None:
    fig, ax = figure(width=8)
    names = list(result["encoders"])
    keys = (("engine_images_per_s", "engine path (encode_image_files)"), ("loader_images_per_s", "encoder's DataLoader"),
            ("bare_images_per_s", "bare model forward"), ("captions_per_s", "captions (encode_captions)"))
    width = 0.2
    for j, (key, label) in enumerate(keys):
        values = [result["encoders"][n].get(key) or 0.0 for n in names]
        bars = ax.bar(np.arange(len(names)) + (j - 1.5) * width, values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("throughput (items/s)")
    ax.set_xlabel("encoder")
    effs = ", ".join(f"{n}: {r['pipeline_efficiency']:.2f}" for n, r in result["encoders"].items() if r.get("pipeline_efficiency"))
    ax.set_title(f"encoding throughput (pipeline_efficiency = engine ÷ bare: {effs or 'n/a'})", fontsize=9)
    ax.legend(fontsize=8)
    save_plot(fig, out_dir, NAME)
