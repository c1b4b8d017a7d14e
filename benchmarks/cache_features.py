"""Cache the frozen-tower features a towers recipe trains on, ahead of `seesay train` (one process, in order).

    python -m benchmarks.cache_features --backbones lite0,lite2 --text-model mpnet --image-depth 4 --text-depth 1

Plain views of train and dev first, then the caption token states, then the mirrored train
views, so a run that is cut short has cached what training needs most.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from retrieval.datasets import SHARED_FLICKR8K, load_dataset
from retrieval.backbones import efficientnet as effnet
from retrieval.training import features as feats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED_FLICKR8K)
    p.add_argument("--backbones", default="lite0,lite2")
    p.add_argument("--text-model", default="mpnet")
    p.add_argument("--image-depth", type=int, default=4)
    p.add_argument("--text-depth", type=int, default=1)
    p.add_argument("--no-flip", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # caching progress, on stderr
    names = args.backbones.split(",")
    effnet.check_backbones(names)
    decoded = effnet.decode_size(names)
    csv = args.data / "captions.csv"
    splits = {s: load_dataset(csv, split_file=args.data / "splits" / f"{s}.txt") for s in ("train", "dev")}
    paths = {s: [r.image_path for r in ds.records if r.captions] for s, ds in splits.items()}
    for split in ("train", "dev"):
        for name in names:
            feats.image_features(paths[split], args.image_depth, backbone=name, decoded=decoded)
    for ds in splits.values():
        captions = [c for r in ds.records if r.captions for c in r.captions]
        feats.text_features(captions, args.text_model, args.text_depth)
    if not args.no_flip:
        for name in names:
            feats.image_features(paths["train"], args.image_depth, flip=True, backbone=name, decoded=decoded)
    print("cached")


if __name__ == "__main__":
    main()
