"""Reproduce the shipped default model: `python -m retrieval.training.reproduce [--out DIR]`.

Trains the `towers` encoder on the Flickr8k train split, selects the epoch on dev, and
writes the model directory (default: runs/towers-flickr8k; the shipped copy lives in
retrieval/models/towers-flickr8k). Data: ../shared/data/flickr8k beside the project root,
or --data. Extra `--set key=value` pairs override the training settings.
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

# The settings of the shipped model (see retrieval/models/towers-flickr8k/encoder.json).
SHIPPED: dict = {
    "epochs": 15,
    "flip": True,
    "patience": 4,
    "batch_size": 256,
    "lr": 1e-3,
    "loss": "infonce",
    "head": "linear",
    "embed_dim": 1024,
    "image_top": 4,
    "text_top": 1,
    "seed": 0,
}


def main(argv: list[str] | None = None) -> None:
    root = Path(__file__).resolve().parents[2]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=root.parent / "shared" / "data" / "flickr8k")
    p.add_argument("--out", type=Path, default=root / "runs" / "towers-flickr8k")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    from retrieval.datasets import load_dataset
    from retrieval.training.trainer import train_encoder

    settings = dict(SHIPPED)
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value
    csv = args.data / "captions.csv"
    train = load_dataset(csv, split_file=args.data / "splits" / "train.txt")
    dev = load_dataset(csv, split_file=args.data / "splits" / "dev.txt")
    print(json.dumps(settings))
    out = train_encoder("towers", train, dev, args.out, resume=args.resume, **settings)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
