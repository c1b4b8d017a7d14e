"""Reproduce the shipped default model: `python -m retrieval.training.reproduce [--out DIR]`.

Trains the `towers` encoder (`SHIPPED_SPEC`: its text model) on the Flickr8k train split, selects the epoch on dev, and
writes the model directory (default: runs/towers-flickr8k; the shipped copy lives in
retrieval/models/towers-flickr8k). The settings are `TrainConfig`'s defaults, which are the
shipped model's recipe; `--set key=value` pairs override some. Data: ../shared/data/flickr8k
beside the project root, or --data.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
from pathlib import Path

from retrieval.datasets import SHARED_FLICKR8K
from retrieval.training.config import SHIPPED_SPEC, TrainConfig


def main(argv: list[str] | None = None) -> None:
    root = Path(__file__).resolve().parents[2]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED_FLICKR8K)
    p.add_argument("--out", type=Path, default=root / "runs" / "towers-flickr8k")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the trainer's progress, on stderr
    from retrieval.datasets import load_dataset
    from retrieval.training.trainer import train_encoder

    settings: dict = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value
    csv = args.data / "captions.csv"
    train = load_dataset(csv, split_file=args.data / "splits" / "train.txt")
    dev = load_dataset(csv, split_file=args.data / "splits" / "dev.txt")
    config = dataclasses.replace(TrainConfig(), **settings)
    print(json.dumps(dataclasses.asdict(config)))
    out = train_encoder(SHIPPED_SPEC, train, dev, args.out, config, resume=args.resume)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
