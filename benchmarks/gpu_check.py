"""GPU checks in one run, for a machine lent for minutes: encode throughput and the trainer's GPU path.

    python -m benchmarks.gpu_check --data DIR [--text-model DIR] [--out DIR] [STAGE ...]

Stages (default all): `env`, `encode_vitb32` (open_clip ViT-B-32, random weights, 8,192
images), `encode_vitb32_long` (32,768), `encode_towers` (EfficientNet-Lite0 + the text
model, untrained heads), `train` (3 epochs of the towers trainer in bf16 on 300 images of
DIR, validated on 100). DIR is laid out as Flickr8k (`captions.csv`, `images/`,
`splits/dev.txt` for encoding, `splits/train300.txt` and `splits/val100.txt` for
training); images are cycled to reach the counts. `--text-model` takes any
sentence-transformers directory (a small random one will do for speed figures where
MiniLM is not installed). Each stage's figures or error go to `OUT/gpu.json` as it
finishes, so a run cut short keeps what it measured; results of the committed runs are in
`benchmarks/results/gpu/`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable


def _env(args) -> dict[str, Any]:
    import open_clip
    import torch
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "open_clip": open_clip.__version__,
            "gpu": torch.cuda.get_device_name(0), "cpus": len(os.sched_getaffinity(0))}


def _encode(spec: str, n: int, repeats: int) -> Callable:
    def stage(args) -> dict[str, Any]:
        from benchmarks.encode import bench_encoder, flickr_sample
        from retrieval.encoders.registry import load_encoder

        paths, captions = flickr_sample(n, 2000, args.data)
        if spec == "towers":
            from retrieval.encoders.towers import TowersEncoder

            encoder = TowersEncoder({"text_model": args.text_model, "image_top": 1, "text_top": 1, "embed_dim": 1024})
        else:
            encoder = load_encoder(spec)
        return bench_encoder(encoder, paths, captions, 256, repeats)

    return stage


def _train(args) -> dict[str, Any]:
    from retrieval.datasets import load_dataset
    from retrieval.encoders.registry import load_encoder
    from retrieval.training.curves import LOG
    from retrieval.training.trainer import train_encoder

    captions = args.data / "captions.csv"
    tr = load_dataset(captions, split_file=args.data / "splits" / "train300.txt")
    va = load_dataset(captions, split_file=args.data / "splits" / "val100.txt")
    start = time.time()
    out = train_encoder(f"towers:{args.text_model}", tr, va, args.out / "run", epochs=3, batch_size=64, image_top=2,
                        text_top=1, flip=True, embed_dim=256, cache_dir=args.out / "cache")
    took = time.time() - start
    encoder = load_encoder(out)
    vectors = encoder.encode_images(sorted((args.data / "images").iterdir())[:8], 4)
    return {"seconds": took, "log": [json.loads(line) for line in (out / LOG).read_text().splitlines()],
            "reloaded_device": str(encoder.device), "reloaded_vectors": list(vectors.shape)}


STAGES: dict[str, Callable] = {
    "env": _env,
    "encode_vitb32": _encode("openclip-random:ViT-B-32", 8192, 2),
    "encode_vitb32_long": _encode("openclip-random:ViT-B-32", 32768, 1),
    "encode_towers": _encode("towers", 8192, 2),
    "train": _train,
}


def main() -> None:
    from retrieval.datasets import SHARED_FLICKR8K

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", help=f"any of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--data", type=Path, default=SHARED_FLICKR8K)
    parser.add_argument("--text-model", default="minilm")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the trainer's progress, on stderr
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name in args.stages or STAGES:
        start = time.time()
        try:
            results[name] = STAGES[name](args)
        except Exception as exc:  # noqa: BLE001 - record the failure and go on to the next stage
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        print(f"== {name}: {time.time() - start:.1f} s", flush=True)
        (args.out / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
    for name, r in results.items():
        if "engine_images_per_s" in r:
            print(f"{name}: engine {r['engine_images_per_s']:.0f} img/s, loader {r['loader_images_per_s']:.0f}, "
                  f"bare {r['bare_images_per_s']:.0f}, decode-only {r['decode_only_images_per_s']:.0f} "
                  f"({r['decode_workers']} workers), captions {r['captions_per_s']:.0f}/s, {r['device']}")
        elif "error" in r:
            print(f"{name}: ERROR {r['error']}")


if __name__ == "__main__":
    main()
