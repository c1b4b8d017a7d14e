"""`seesay bench quality`: recall@k both ways, ranks and RSUM of every available encoder.

Encoders: the two bag-of-words baselines (bow-pmi, bow-ratio; fitted by `fit_bow` on the
training split and cached under runs/bench-bow/ unless a saved model directory is given),
`zeroshot`, the shipped trained towers `default`, and any spec passed with --encoder
(e.g. `openclip:ViT-B-32@/path/to/weights.pt`). An encoder that cannot load is skipped with
its reason. Each is scored by `seesay eval`'s own code (`retrieval.evaluation.embed` and
`score`: hubness-corrected queries for an encoder with a query bank, plus `without_hubness`), so
its result equals `seesay eval --json`; recall is also computed at k = 1..10 and 50 for the plot.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence


from benchmarks.report import FLICKR, figure, machine, save_plot
from retrieval import evaluation
from retrieval.datasets import Record, load_dataset
from retrieval.encoders.base import Encoder
from retrieval.encoders.registry import load_encoder
from retrieval.evaluation import cross_modal_recall, embed

NAME = "quality"
log = logging.getLogger(__name__)
CACHE = Path(__file__).resolve().parents[1] / "runs" / "bench-bow"
CURVE_KS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 50)
NEURAL = ("zeroshot", "default")


def bow_encoder(kind: str, train: Sequence[Record], config_overrides: dict[str, Any], cache: Path) -> Encoder:
    """A bag-of-words encoder fitted on `train` by `fit_bow`, reused from `cache` when fitted before."""
    from retrieval.encoders.bow import BowConfig, fit_bow
    from retrieval.backbones.efficientnet import PREPROCESS_ID

    config = BowConfig(theta="pmi" if kind == "bow-pmi" else "ratio", **config_overrides)
    key = hashlib.sha256(
        json.dumps({"config": asdict(config), "labels": PREPROCESS_ID, "train": [str(r.image_path) for r in train]},
                   sort_keys=True).encode()
    ).hexdigest()[:16]
    directory = cache / f"{kind}-{key}"
    if (directory / "encoder.json").is_file():
        return load_encoder(directory)
    log.info(f"fitting {kind} on {len(train)} training images (cached in {directory})")
    encoder, _problems = fit_bow(train, config)
    encoder.save(directory)
    return load_encoder(directory)


def score(encoder: Encoder, records: Sequence[Record], batch_size: int = 64) -> dict[str, Any]:
    """`seesay eval --json`'s result for `encoder`, plus recall at CURVE_KS under `curve`."""
    embedded = embed(encoder, records, batch_size)
    result = evaluation.score(encoder, embedded).to_dict()
    ks = [k for k in CURVE_KS if k <= len(embedded.image_vecs)]
    curve = cross_modal_recall(encoder, embedded.image_vecs, embedded.text_vecs, embedded.owner, ks)
    result["curve"] = {way: {k: v for k, v in getattr(curve, way).items() if k.startswith("R@")} for way in ("t2i", "i2t")}
    return result


def run(
    data: Path = FLICKR / "captions.csv",
    split_file: Path | None = FLICKR / "splits" / "dev.txt",
    train_split_file: Path | None = FLICKR / "splits" / "train.txt",
    encoders: Sequence[str] = (),
    bow_models: dict[str, Path] | None = None,
    quick: bool = False,
    n_images: int | None = None,
    n_train: int | None = None,
    cache: Path = CACHE,
    skip: Sequence[str] = (),
) -> dict[str, Any]:
    """Score every available encoder on the dataset (default Flickr8k dev)."""
    records = load_dataset(data, split_file=split_file).records
    n_images = n_images or (100 if quick else None)
    if n_images:
        records = records[:n_images]
    # --quick: colour words only (no EfficientNet object words) on 300 training images, so
    # the baselines fit in seconds; the full run uses BowConfig's defaults on all of train.
    bow_overrides: dict[str, Any] = {"objects": 0} if quick else {}
    n_train = n_train or (300 if quick else None)
    result: dict[str, Any] = {
        "benchmark": NAME,
        "data": str(data),
        "split_file": str(split_file) if split_file else None,
        "quick": quick,
        "n_images": len(records),
        "machine": machine(),
        "bow_config_overrides": bow_overrides,
        "encoders": {},
        "skipped": {},
        "seconds": {},
    }
    candidates: list[tuple[str, Callable[[], Encoder]]] = []
    train: list[Record] | None = None
    for kind in ("bow-pmi", "bow-ratio"):
        if bow_models and kind in bow_models:
            candidates.append((kind, lambda p=bow_models[kind]: load_encoder(p)))
            continue

        def fitted(kind: str = kind) -> Encoder:
            nonlocal train
            if train is None:
                if train_split_file is None:
                    raise ValueError("no training split to fit the bag-of-words baseline on")
                train = load_dataset(data, split_file=train_split_file).records
                if n_train:
                    train = train[:n_train]
            return bow_encoder(kind, train, bow_overrides, cache)

        candidates.append((kind, fitted))
    for spec in (*NEURAL, *encoders):
        candidates.append((spec, lambda s=spec: load_encoder(s)))

    for name, make in candidates:
        if name in skip:
            continue
        start = time.perf_counter()
        try:
            encoder = make()
        except Exception as exc:  # not available here: say why and go on
            result["skipped"][name] = f"{type(exc).__name__}: {exc}"
            log.info(f"skipping {name}: {exc}")
            continue
        log.info(f"scoring {name} on {len(records)} images")
        result["encoders"][name] = score(encoder, records)
        result["seconds"][name] = time.perf_counter() - start
    return result


def plot(result: dict[str, Any], out_dir) -> None:
    fig, (left, right) = figure(ncols=2, width=12)
    for name, r in result["encoders"].items():
        for ax, way in ((left, "t2i"), (right, "i2t")):
            curve = r["curve"][way]
            ks = [int(k[2:]) for k in curve]
            ax.plot(ks, list(curve.values()), marker="o", label=f"{name} (RSUM {r['rsum']:.0f})")
    for ax, title in ((left, "text → image"), (right, "image → text")):
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 5, 10, 50])
        ax.set_xticklabels(["1", "2", "5", "10", "50"])
        ax.set_xlabel("k (results examined)")
        ax.set_ylabel("recall@k (% of queries)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{title}, {result['n_images']} images ({Path(result['split_file']).stem if result['split_file'] else 'all'})")
        ax.legend(fontsize=8)
    save_plot(fig, out_dir, NAME)
