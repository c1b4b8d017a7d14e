"""Attach hubness correction (a query bank) to a saved towers model, encoding the bank with the model itself.

    python -m retrieval.training.hubness --model DIR --data captions.csv --split-file splits/train.txt [--tau 0.1]

Draws `--images` training images and `--texts` training captions at random (seeded), encodes
them with the model, and writes `querybank.pt` beside its weights, recording the temperature
in encoder.json (see `retrieval.encoders.querybank`). The shipped default was made this way
from retrieval/models/towers-flickr8k and the Flickr8k train split.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from retrieval.datasets import Record
from retrieval.embedding import encode_captions, encode_image_files
from retrieval.encoders import querybank as qb
from retrieval.encoders.towers import TowersEncoder
from retrieval.errors import BadDataError


def encode_pool(encoder: TowersEncoder, records: Sequence[Record], n_images: int, n_texts: int,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain (uncorrected) unit vectors of `n_images` random images and `n_texts` random captions of `records`."""
    bank, encoder.querybank = encoder.querybank, None
    try:
        rng = np.random.default_rng(seed)
        captioned = [r for r in records if r.captions]
        if not captioned:
            raise BadDataError("no captioned training images to draw a query bank from")
        picked = rng.permutation(len(captioned))[:n_images]
        images, _, _ = encode_image_files(encoder, [captioned[i].image_path for i in picked], 32)
        texts = [c for r in captioned for c in r.captions]
        chosen = [texts[i] for i in rng.permutation(len(texts))[:n_texts]]
        captions = encode_captions(encoder, chosen)
    finally:
        encoder.querybank = bank
    return torch.from_numpy(images), torch.from_numpy(captions)


def attach(encoder: TowersEncoder, records: Sequence[Record], tau: float = qb.DEFAULT_TAU, seed: int = 0,
           n_images: int = qb.IMAGE_BANK, n_texts: int = qb.TEXT_BANK) -> TowersEncoder:
    """Give `encoder` a query bank drawn from `records` (its training pairs) and return it."""
    images, texts = encode_pool(encoder, records, n_images, n_texts, seed)
    encoder.set_querybank(qb.QueryBank(images, texts, tau))
    return encoder


def save_bank(encoder: TowersEncoder, directory: Path) -> None:
    """Write `encoder`'s query bank into its saved model `directory`, leaving the heads' file as it is."""
    import hashlib
    import json

    from retrieval.encoders.base import MANIFEST, read_manifest, weights_digest

    directory = Path(directory)
    encoder.querybank.save(directory)
    manifest = read_manifest(directory)
    manifest["config"]["hubness_tau"] = encoder.querybank.tau
    manifest["config"]["zeroshot_weight"] = encoder.cfg["zeroshot_weight"]
    manifest["dim"] = encoder.dim
    data = (directory / qb.WEIGHTS).read_bytes()
    if isinstance(manifest.get("files"), dict):
        manifest["files"][qb.WEIGHTS] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["digest"] = weights_digest(directory)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(directory / MANIFEST)


def main(argv: list[str] | None = None) -> None:
    from retrieval.datasets import load_dataset
    from retrieval.encoders import load_encoder
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a saved towers model directory (updated in place)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split-file", type=Path, required=True, help="the model's training images")
    p.add_argument("--tau", type=float, default=qb.DEFAULT_TAU)
    p.add_argument("--images", type=int, default=qb.IMAGE_BANK)
    p.add_argument("--texts", type=int, default=qb.TEXT_BANK)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zeroshot-weight", type=float, default=None, help="also mix zero-shot coordinates in with this weight")
    args = p.parse_args(argv)
    encoder = load_encoder(args.model)
    if not isinstance(encoder, TowersEncoder):
        raise SystemExit(f"{args.model} is not a towers model")
    if args.zeroshot_weight is not None:
        encoder.set_zeroshot_weight(args.zeroshot_weight)
    train = load_dataset(args.data, split_file=args.split_file)
    save_bank(attach(encoder, train.records, args.tau, args.seed, args.images, args.texts), args.model)
    print(f"query bank ({args.images} images, {args.texts} captions, tau {args.tau}) saved in {args.model}")


if __name__ == "__main__":
    main()
