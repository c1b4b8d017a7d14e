"""Contrastive training of the `towers` encoder on cached frozen-tower features.

One caption per image per batch (a random one each epoch), so captions of one image are never
each other's negatives; batches reshuffled every epoch; AdamW with per-group learning rates
(trained tower blocks at `top_lr_scale` × lr), linear warm-up then cosine decay; validation
recall@k each epoch; the best epoch by validation RSUM is the saved model; a checkpoint after
every epoch lets `resume=True` continue after an interruption; JSONL log and a learning-curve
PNG. The seams, as in open_clip_train: settings (`config.TrainConfig`), inputs
(`towers_data`, cached by `features`), one epoch (`loop`), the schedule (`schedule`), several
processes under torchrun with DistributedDataParallel (`distributed`); bf16 autocast and
pinned-memory transfers on a GPU (`retrieval.runtime`).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import torch

from indexer.files import atomic_path
from retrieval import runtime
from retrieval.datasets import Dataset
from retrieval.encoders.base import read_manifest
from retrieval.encoders.towers import DEFAULT_CONFIG, KIND, TowerHeads, TowersEncoder, load_heads_state, parse_spec
from retrieval.metrics import RecallResult, recall_at_k
from retrieval.training import distributed
from retrieval.training.config import TrainConfig, TrainingError
from retrieval.training.curves import CURVE, plot_curves, write_log
from retrieval.training.loop import Progress, describe, train_one_epoch
from retrieval.training.losses import global_batch_loss
from retrieval.training.schedule import Schedule
from retrieval.training.towers_data import TowersSplit, split_vectors

__all__ = ["CHECKPOINT", "TrainConfig", "TrainingError", "evaluate", "train_encoder"]

CHECKPOINT = "checkpoint.pt"

log = logging.getLogger(__name__)


def train_encoder(spec: str, train: Dataset, val: Dataset | None, out: Path, config: TrainConfig | None = None, *,
                  resume: bool = False, cache_dir: Path | None = None, device: str | None = None,
                  **settings: Any) -> Path:
    """Train `spec` (`towers` or `towers:TEXT_MODEL_DIR`) on `train`, select on `val`, save to `out`.

    The settings are `config` (default: `TrainConfig()`, the shipped model's recipe) with
    `settings` (TrainConfig fields) replacing some. Returns `out`, a model directory loadable
    with `load_encoder(out)` (best epoch by validation RSUM; the last epoch when `val` is None).
    `out/checkpoint.pt` holds the last finished epoch for `resume=True`. With `hubness_tau` the
    saved model gets a query bank from the training pairs; validation recall is logged with and
    without it. Progress is logged (`logging`, rank 0 only under torchrun). Images that are missing or unreadable are skipped and reported; a non-finite loss
    stops training with TrainingError, keeping the last good checkpoint and best model.
    """
    if spec.partition(":")[0] != KIND:
        raise TrainingError(f"seesay can train the {KIND!r} encoder (optionally {KIND}:TEXT_MODEL_DIR), not {spec!r}")
    config = dataclasses.replace(config or TrainConfig(), **settings)
    config.check()
    out = Path(out)
    ranks = distributed.init_distributed(device)
    runtime.keep_freed_memory()
    # Building the encoder validates the text model; its cfg is the saved model's config.
    base = TowersEncoder({**DEFAULT_CONFIG, **parse_spec(spec), **config.model_config()}, spec=spec, device=ranks.device)
    # Seeded after the towers load: loading a model that this process has not cached yet draws on torch's RNG,
    # so heads made before it started from a point that depended on what the process had loaded earlier.
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    cfg, heads = base.cfg, base.fresh_heads().to(ranks.device)
    tr, va, skipped = _splits(train, val, cfg, config, cache_dir, ranks.device)
    opt = torch.optim.AdamW(param_groups(heads, config.lr, config.top_lr_scale, config.weight_decay),
                            lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = Schedule(len(tr.batches(config.batch_size * ranks.world, config.seed, 0)), config.epochs, config.warmup_epochs)
    progress = _start(out, resume, cfg, heads, opt)
    if ranks.device.type == "cuda":
        tr.pin()
    model = distributed.wrap(heads, ranks, find_unused=config.loss == "vse")  # the hinge leaves the temperature unused

    def inputs(images, captions, views) -> tuple:
        return (tr.image_batch(images, views, ranks.device), *tr.text_batch(tr.caption_ids(images, captions), ranks.device))

    def loss(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return global_batch_loss(image, text, heads.logit_scale, config.loss, config.label_smoothing, config.margin)

    record = _record(spec, config, tr, va)
    for epoch in range(progress.start_epoch, config.epochs):
        if progress.stop_early(config.patience, va is not None):
            log.info(f"early stop: no validation RSUM gain for {config.patience} epochs")
            break
        heads.train()
        entry = train_one_epoch(model, tr.batches(config.batch_size * ranks.world, config.seed, epoch), inputs, loss, opt,
                                heads.parameters(), heads.logit_scale, ranks, schedule, epoch, lambda: _where_good(out))
        improved = progress.record(entry, evaluate(heads, va, ranks.device) if va is not None else None)
        if ranks.main:
            _save_epoch(out, spec, cfg, heads, opt, progress, record, epoch, improved, skipped if epoch == progress.start_epoch else None)
            log.info(describe(entry, improved and va is not None))
    if ranks.main:
        plot_curves(out / CURVE, progress.history)
        if config.hubness_tau:
            _attach_querybank(out, tr, va, config.hubness_tau, config.seed)
    return out


def _splits(train: Dataset, val: Dataset | None, cfg: dict, config: TrainConfig, cache_dir: Path | None,
            device: torch.device) -> tuple[TowersSplit, TowersSplit | None, list[str]]:
    """The training and validation splits as cached features, and what was skipped (logged here)."""
    log.info(f"caching frozen-tower features (train {len(train.records)} images)")
    tr = TowersSplit(train, cfg, config.flip, cache_dir, "train", device, config.max_captions)
    va = TowersSplit(val, cfg, False, cache_dir, "val", device) if val is not None and val.records else None
    skipped = tr.problems + (va.problems if va else [])
    for p in skipped[:20]:
        log.info(f"  {p}")
    if skipped:
        log.info(f"  {len(skipped)} image(s) skipped or without captions")
    return tr, va, skipped


def param_groups(heads: TowerHeads, lr: float, top_lr_scale: float, weight_decay: float) -> list[dict]:
    """AdamW groups: tower blocks at `top_lr_scale` × lr, heads at lr; no decay on biases, norms, the temperature."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in heads.named_parameters():
        top = name.startswith(("image_top.", "text_top."))
        decay = p.ndim >= 2 and name != "logit_scale"
        groups.setdefault((top, decay), []).append(p)
    return [
        {"params": ps, "lr": lr * (top_lr_scale if top else 1.0), "base_lr": lr * (top_lr_scale if top else 1.0),
         "weight_decay": weight_decay if decay else 0.0, "name": f"{'top' if top else 'heads'}{'' if decay else '-nodecay'}"}
        for (top, decay), ps in sorted(groups.items())
    ]


@torch.no_grad()
def evaluate(heads: TowerHeads, split: TowersSplit, device: torch.device, batch: int = 500) -> RecallResult:
    """Recall@k of the current heads on a cached split (plain view, every caption)."""
    img, txt = split_vectors(heads, split, device, batch)
    return recall_at_k(img.numpy(), txt.numpy(), split.text_to_image)


def _record(spec: str, config: TrainConfig, tr: TowersSplit, va: TowersSplit | None) -> dict[str, Any]:
    """The run's settings as the saved model's manifest records them (`config.train`)."""
    keys = ("epochs", "batch_size", "lr", "loss", "seed", "top_lr_scale", "weight_decay", "warmup_epochs",
            "label_smoothing", "margin", "flip", "patience", "max_captions", "hubness_tau")
    return {"spec": spec, **{k: getattr(config, k) for k in keys},
            "train_images": len(tr.records), "val_images": len(va.records) if va else 0}


def _start(out: Path, resume: bool, cfg: dict, heads: TowerHeads, opt: torch.optim.Optimizer) -> Progress:
    """A fresh record, or the one of `out`'s checkpoint (weights and optimiser restored) with `resume`."""
    path = out / CHECKPOINT
    if not path.is_file():
        return Progress()
    if not resume:
        log.info(f"{out} holds an earlier run; starting afresh (pass resume=True to continue it)")
        return Progress()
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("cfg") != cfg:
        diff = {k: (state.get("cfg", {}).get(k), v) for k, v in cfg.items() if state.get("cfg", {}).get(k) != v}
        raise TrainingError(f"{path} was trained with other settings (checkpoint vs now: {diff}); "
                            "use another --out or drop --resume")
    load_heads_state(heads, state["heads"], str(path))
    opt.load_state_dict(state["optimizer"])
    log.info(f"resumed from {path} after epoch {state['epoch'] + 1}")
    return Progress.from_checkpoint(state)


def _where_good(out: Path) -> str:
    ckpt = out / CHECKPOINT
    best = f" and the best model is in {out}" if (out / "encoder.json").is_file() else ""
    return f"The last good checkpoint is {ckpt if ckpt.is_file() else 'not written yet'}{best}"


def _save_epoch(out: Path, spec: str, cfg: dict, heads: TowerHeads, opt: torch.optim.Optimizer, progress: Progress,
                record: dict, epoch: int, improved: bool, skipped: list[str] | None) -> None:
    """After an epoch: the model when it is the best so far, the checkpoint, the log."""
    out.mkdir(parents=True, exist_ok=True)
    if improved:
        entry = progress.history[-1]
        enc = TowersEncoder(cfg, heads=copy.deepcopy(heads).cpu().eval(), spec=spec, device=torch.device("cpu"))
        enc.cfg["train"] = {**record, "best_epoch": epoch + 1, **{k: v for k, v in entry.items() if k.startswith("val_")}}
        enc.save(out)
    with atomic_path(out / CHECKPOINT) as tmp:
        torch.save({"heads": {k: v.cpu() for k, v in heads.state_dict().items()}, "optimizer": opt.state_dict(),
                    "cfg": cfg, **progress.state(epoch)}, tmp)
    write_log(out, progress.history, skipped)


def _attach_querybank(out: Path, tr: TowersSplit, va: TowersSplit | None, tau: float, seed: int) -> None:
    """Re-save the best model in `out` with a query bank from the training pairs; log validation recall with it."""
    from retrieval.encoders import querybank as qb
    from retrieval.evaluation import cross_modal_recall

    manifest = read_manifest(out)
    enc = TowersEncoder.from_saved(out, manifest["config"])
    enc._spec = manifest["spec"]
    cpu = torch.device("cpu")
    images, texts = split_vectors(enc.heads, tr, cpu)
    enc.set_querybank(qb.fit(images, texts, tau, seed=seed))
    if va is not None:
        images, texts = split_vectors(enc.heads, va, cpu)
        gallery_i = enc.querybank.with_bias(images.numpy(), "image")
        gallery_t = enc.querybank.with_bias(texts.numpy(), "caption")
        r = cross_modal_recall(enc, gallery_i, gallery_t, va.text_to_image)
        enc.cfg["train"].update({"hub_val_i2t_R@1": r.i2t["R@1"], "hub_val_t2i_R@1": r.t2i["R@1"], "hub_val_rsum": r.rsum})
        log.info(f"with hubness correction (tau {tau}): val i2t R@1 {r.i2t['R@1']:.2f} t2i R@1 {r.t2i['R@1']:.2f} "
            f"rsum {r.rsum:.1f}")
    enc.save(out)
