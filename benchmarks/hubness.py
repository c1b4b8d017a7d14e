"""Dev recall of a towers model with and without hubness correction, for query banks drawn with several seeds.

    python -m benchmarks.hubness --model retrieval/models/towers-flickr8k --seeds 0,1 [--save-seed 0] [--tau 0.1]

Encodes the dev split once (plain vectors, `retrieval.evaluation.embed`), then for each seed
draws a bank of training images and captions (`retrieval.training.hubness.encode_pool`), adds
each dev item's bias coordinate and scores both directions as the index would. `--save-seed` writes that seed's
bank into the model directory (how the shipped default's bank was made). Prints a table and
writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from retrieval.datasets import SHARED_FLICKR8K
from retrieval.encoders import querybank as qb


def main(argv: list[str] | None = None) -> None:
    from retrieval.datasets import load_dataset
    from retrieval.encoders import load_encoder
    from retrieval.evaluation import cross_modal_recall, embed
    from retrieval.metrics import recall_at_k
    from retrieval.training.hubness import encode_pool, save_bank

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, default=SHARED_FLICKR8K)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--tau", type=float, default=qb.DEFAULT_TAU)
    p.add_argument("--save-seed", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("seesay-bench") / "hubness.json")
    p.add_argument("--vectors", type=Path, default=None, help="also save the dev and bank vectors here (.npz)")
    args = p.parse_args(argv)
    csv = args.data / "captions.csv"
    train = load_dataset(csv, split_file=args.data / "splits" / "train.txt")
    enc = load_encoder(args.model)
    enc.set_querybank(None)
    t0 = time.time()
    dev = embed(enc, load_dataset(csv, split_file=args.data / "splits" / "dev.txt").records, 32)  # plain vectors
    images, texts, owner = dev.image_vecs, dev.text_vecs, dev.owner
    plain = recall_at_k(images, texts, owner)
    saved = {"dev_images": images, "dev_texts": texts, "dev_owner": owner}
    rows = [{"bank_seed": None, "i2t_R@1": plain.i2t["R@1"], "t2i_R@1": plain.t2i["R@1"], "rsum": plain.rsum}]
    print(f"dev encoded in {time.time() - t0:.0f} s; without hubness: i2t R@1 {plain.i2t['R@1']:.1f}, "
          f"t2i R@1 {plain.t2i['R@1']:.1f}, RSUM {plain.rsum:.1f}", flush=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        bank_images, bank_texts = encode_pool(enc, train.records, qb.IMAGE_BANK, qb.TEXT_BANK, seed)
        saved.update({f"bank{seed}_images": bank_images.numpy(), f"bank{seed}_texts": bank_texts.numpy()})
        if args.vectors:
            np.savez(args.vectors, **saved)
        enc.set_querybank(qb.QueryBank(bank_images, bank_texts, args.tau))
        r = cross_modal_recall(enc, enc.querybank.with_bias(images, "image"), enc.querybank.with_bias(texts, "caption"), owner)
        rows.append({"bank_seed": seed, "i2t_R@1": r.i2t["R@1"], "t2i_R@1": r.t2i["R@1"], "rsum": r.rsum,
                     "i2t": r.i2t, "t2i": r.t2i})
        print(f"bank seed {seed}, tau {args.tau}: i2t R@1 {r.i2t['R@1']:.1f}, t2i R@1 {r.t2i['R@1']:.1f}, "
              f"RSUM {r.rsum:.1f}", flush=True)
        if seed == args.save_seed:
            save_bank(enc, args.model)
            print(f"saved bank seed {seed} in {args.model}", flush=True)
        enc.set_querybank(None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "tau": args.tau, "dev_images": len(images), "rows": rows,
                                    "plain": {"i2t": plain.i2t, "t2i": plain.t2i}}, indent=1))


if __name__ == "__main__":
    main()
