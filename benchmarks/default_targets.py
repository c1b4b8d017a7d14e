"""Issue 12's figures for a default encoder, each beside its target, in one run.

    python -m benchmarks.default_targets --model default --seed-model runs/seed1 --ood /tmp/ood-clipart [--speed]

- Flickr8k dev recall (with and without its hubness correction) of `--model` and of every
  `--seed-model` (the same recipe trained with other seeds): image→text R@1 ≥ 42, text→image ≥ 31.
- The out-of-domain dev set (`benchmarks/ood_clipart.py` builds it): `--model` against `zeroshot`,
  R@1 each way, target: at least the zero-shot encoder's.
- With `--speed`: text query p50 at 100k images in an IVF index (`benchmarks.query`, target ≤ 30 ms),
  image indexing from JPEG files through the engine path (`benchmarks.encode`, ≥ 15 images/s)
  and its system CPU time over user time (≤ 0.15).

Prints one line per figure and writes everything as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from retrieval.datasets import SHARED_FLICKR8K

DEV_TARGET = {"i2t": 42.0, "t2i": 31.0}
SPEED_TARGETS = {"query_p50_ms": ("≤", 30.0), "engine_images_per_s": ("≥", 15.0), "engine_sys_per_user": ("≤", 0.15)}


def _r1(result) -> dict[str, float]:
    """R@1 both ways and RSUM of a `RecallResult` or `Evaluation`."""
    return {"i2t": result.i2t["R@1"], "t2i": result.t2i["R@1"], "rsum": result.rsum}


def dev_recall(specs: list[str], data: Path) -> dict[str, Any]:
    """Flickr8k dev R@1 of each encoder, with its hubness correction and without."""
    from retrieval.datasets import load_dataset
    from retrieval.encoders import load_encoder
    from retrieval.evaluation import evaluate

    records = load_dataset(data / "captions.csv", split_file=data / "splits" / "dev.txt").records
    out = {}
    for spec in specs:
        r = evaluate(load_encoder(spec), records, 32)
        out[spec] = {"corrected": _r1(r), "plain": _r1(r.without_hubness) if r.without_hubness is not None else None}
        hit = all(out[spec]["corrected"][d] >= DEV_TARGET[d] for d in DEV_TARGET)
        print(f"dev {spec}: i2t R@1 {out[spec]['corrected']['i2t']:.1f} (target ≥ {DEV_TARGET['i2t']:.0f}), "
              f"t2i R@1 {out[spec]['corrected']['t2i']:.1f} (≥ {DEV_TARGET['t2i']:.0f}), "
              f"RSUM {out[spec]['corrected']['rsum']:.1f}"
              + (f"; without hubness {out[spec]['plain']['i2t']:.1f} / {out[spec]['plain']['t2i']:.1f}" if out[spec]["plain"] else "")
              + f" — {'met' if hit else 'not met'}", flush=True)
    return out


def ood_recall(spec: str, captions: Path) -> dict[str, Any]:
    """The out-of-domain set: `spec` against the zero-shot encoder."""
    from benchmarks.ood_clipart import evaluate_encoders

    results = {name: _r1(r) for name, r in evaluate_encoders(captions, [spec, "zeroshot"]).items()}
    ours, ref = results[spec], results["zeroshot"]
    for d in ("i2t", "t2i"):
        print(f"out-of-domain {d} R@1: {spec} {ours[d]:.1f}, zeroshot {ref[d]:.1f} — "
              f"{'met' if ours[d] >= ref[d] else 'not met'}", flush=True)
    return results


def speed(spec: str) -> dict[str, Any]:
    """Query p50 at 100k (IVF), engine images/s from JPEG files and sys/user CPU during encoding."""
    from benchmarks import encode, query

    q = query.run(encoders=[spec], factories=["IVF1024,Flat"])
    e = encode.run(encoders=[spec])["encoders"][spec]
    figures = {"query_p50_ms": q["query_p50_ms"], "engine_images_per_s": e["engine_images_per_s"],
               "engine_sys_per_user": e["engine_sys_per_user"]}
    for key, (op, target) in SPEED_TARGETS.items():
        met = figures[key] <= target if op == "≤" else figures[key] >= target
        print(f"{key}: {figures[key]:.3g} (target {op} {target:g}) — {'met' if met else 'not met'}", flush=True)
    return {"figures": figures, "query": q, "encode": e}


def main(argv: list[str] | None = None) -> None:
    from benchmarks.report import machine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="the encoder shipped as the default (a spec or a model folder)")
    p.add_argument("--seed-model", action="append", default=[], help="the same recipe trained with another seed")
    p.add_argument("--data", type=Path, default=SHARED_FLICKR8K)
    p.add_argument("--ood", type=Path, help="the out-of-domain set's folder (benchmarks/ood_clipart.py --out)")
    p.add_argument("--speed", action="store_true", help="also run the speed figures (several minutes)")
    p.add_argument("--out", type=Path, default=Path("seesay-bench") / "default_targets.json")
    args = p.parse_args(argv)
    result: dict[str, Any] = {"machine": machine(), "dev": dev_recall([args.model, *args.seed_model], args.data)}
    if args.ood:
        result["ood"] = ood_recall(args.model, args.ood / "captions.csv")
    if args.speed:
        result["speed"] = speed(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
