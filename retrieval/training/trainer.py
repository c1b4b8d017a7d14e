"""Contrastive training of the `towers` encoder on cached frozen-tower features.

One caption per image per batch (a random one each epoch), so captions of one image are
never each other's negatives; batches reshuffled every epoch; AdamW with per-group learning
rates (trained tower blocks at `top_lr_scale` × lr), linear warm-up then cosine decay;
validation recall@k each epoch; the best epoch by validation RSUM is the saved model; a
checkpoint after every epoch lets `resume=True` continue after an interruption; JSONL log
and a learning-curve PNG. On a GPU: bf16 autocast and pinned-memory transfers; under
torchrun (WORLD_SIZE > 1) each rank takes its slice of every batch and negatives are gathered from all
ranks (the loss covers the global batch; gradients are summed over ranks, so the
update equals one process's on the whole batch). The frozen parts of both towers run once: their outputs are cached on disk
(`retrieval.training.features`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from retrieval import runtime
from retrieval.datasets import Dataset
from retrieval.encoders.base import read_manifest
from retrieval.encoders.towers import DEFAULT_CONFIG, KIND, TowerHeads, TowersEncoder, load_heads_state, parse_spec
from retrieval.errors import EncoderError, SeesayError
from retrieval.backbones import efficientnet as effnet
from retrieval.training import features as feats
from retrieval.training.curves import CURVE, LOG  # noqa: F401 - LOG is read by benchmarks.gpu_check
from retrieval.training.curves import plot_curves as _plot
from retrieval.training.curves import write_log as _write_log
from retrieval.training.losses import clamp_logit_scale, gather_with_grad, infonce, vse_max_violation
from retrieval.training.schedule import warmup_cosine

CHECKPOINT = "checkpoint.pt"
IMAGE_CACHE_DEPTH = 4  # the map entering each backbone's last four blocks (Lite0: 192×7×7, Lite2: 208×9×9)


class TrainingError(SeesayError):
    """Training cannot go on (bad data, diverged loss, incompatible checkpoint)."""


# ----------------------------------------------------------------------------- data


class _Split:
    """Cached features of one dataset split, restricted to images that decoded."""

    def __init__(self, ds: Dataset, cfg: dict, flip: bool | str, cache_dir: Path | None, log: Callable, name: str,
                 device: torch.device, max_captions: int | None = None) -> None:
        records = [dataclasses.replace(r, captions=r.captions[:max_captions]) for r in ds.records if r.captions]
        self.problems = [f"{r.image_name}: no captions" for r in ds.records if not r.captions]
        paths = [r.image_path for r in records]
        backbones = cfg["image_backbones"]
        maps, bad = [], {}
        for backbone in backbones:
            fmap, backbone_bad = _image_views(paths, backbone, effnet.decode_size(backbones), cfg["image_top"], flip,
                                              cache_dir, log, device)
            maps.append(fmap)
            bad.update(backbone_bad)
        self.problems += [f"{records[i].image_name}: skipped, {reason}" for i, reason in sorted(bad.items())]
        keep = [i for i in range(len(records)) if i not in bad]
        if not keep:
            raise TrainingError(f"{name}: no readable images ({len(bad)} bad)")
        self.records = [records[i] for i in keep]
        self.images = [m[keep] for m in maps]  # per backbone: (N, V, ...)
        self.captions = [c for r in self.records for c in r.captions]
        self.caption_start = np.cumsum([0] + [len(r.captions) for r in self.records])
        self.text_to_image = np.repeat(np.arange(len(self.records)), [len(r.captions) for r in self.records])
        self.text_top = cfg["text_top"]
        self.text = feats.text_features(self.captions, cfg["text_model"], cfg["text_top"], cache_dir=cache_dir, log=log)

    @property
    def n_views(self) -> int:
        return int(self.images[0].shape[1])

    def image_batch(self, idx, view, device) -> list[torch.Tensor]:
        """One float input per backbone for images `idx` in views `view`."""
        return [m[idx, view].to(device, non_blocking=True).float() for m in self.images]

    def text_batch(self, idx, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.text_top == 0:
            return self.text["pooled"][idx].to(device, non_blocking=True), None
        h, mask = feats.pad_tokens(self.text["hidden"], self.text["offsets"], idx)
        return h.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def _image_views(paths: list, backbone: str, decoded: int, image_top: int, flip: bool | str, cache_dir: Path | None,
                 log: Callable, device: torch.device) -> tuple[torch.Tensor, dict[int, str]]:
    """(N, V, ...) cached inputs of one backbone's trained part: the plain view, plus a mirrored one with `flip`.

    flip=True encodes the mirrored images (a second one-off caching pass); flip="maps" mirrors the
    cached maps along their width instead, which costs nothing and approximates it (the
    pretrained networks are close to mirror-equivariant, having been trained on mirrored images).
    """
    depth = max(IMAGE_CACHE_DEPTH, image_top)
    kw = {"cache_dir": cache_dir, "log": log, "device": device, "backbone": backbone, "decoded": decoded}
    fmap, bad = feats.image_features(paths, depth, flip=False, **kw)
    views = [fmap]
    if flip == "maps":
        views.append(torch.flip(fmap, dims=[3]))
    elif flip:
        views.append(feats.image_features(paths, depth, flip=True, **kw)[0])
    fmap = torch.stack(views, dim=1)
    return _lift_images(fmap, backbone, depth, image_top, log, cache_dir, device), bad


def _lift_images(fmap: torch.Tensor, backbone: str, depth: int, image_top: int, log: Callable, cache_dir: Path | None,
                 device: torch.device) -> torch.Tensor:
    """Run the frozen blocks between the cache depth and the trained top once (pooled when image_top is 0)."""
    if image_top == depth:
        return fmap
    import hashlib

    key = hashlib.sha1(fmap.numpy().tobytes()).hexdigest()[:20]
    path = Path(cache_dir or feats.default_cache_dir()) / f"lift-{backbone}-d{depth}-t{image_top}-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    out = _run_frozen(fmap, backbone, depth, image_top, device)
    feats._save(out, path)
    log(f"  lifted image features to {'pooled' if image_top == 0 else f'depth {image_top}'}")
    return out


def _run_frozen(fmap: torch.Tensor, backbone: str, depth: int, image_top: int, device: torch.device) -> torch.Tensor:
    frozen = effnet.TopBlocks(effnet.load_backbone(backbone, str(device)), depth).eval()
    keep_blocks = depth - image_top
    out = []
    with torch.no_grad():
        for s in range(0, len(fmap), 256):
            x = fmap[s : s + 256]
            shape = x.shape
            x = x.flatten(0, 1).to(device).float()
            for block in frozen.blocks[:keep_blocks]:
                x = block(x)
            if image_top == 0:
                x = frozen.act(frozen.bn1(frozen.conv_head(x))).mean(dim=(2, 3))
                out.append(x.reshape(shape[0], shape[1], -1).cpu())
            else:
                out.append(x.half().reshape(shape[0], shape[1], *x.shape[1:]).cpu())
    return torch.cat(out)


def epoch_batches(n_images: int, caption_counts: np.ndarray, batch_size: int, seed: int, epoch: int,
                  n_views: int = 1) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Shuffled batches of (image indices, caption index within image, view) for one epoch.

    Every image appears once per epoch with one randomly chosen caption, so a batch never
    holds two captions of the same image. The same (seed, epoch) gives the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_images)
    caption = (rng.random(n_images) * caption_counts[order]).astype(np.int64)
    view = rng.integers(0, n_views, n_images)
    out = []
    for s in range(0, n_images, batch_size):
        if n_images - s < 2:
            break
        out.append((order[s : s + batch_size], caption[s : s + batch_size], view[s : s + batch_size]))
    return out


# ----------------------------------------------------------------------------- training


def _param_groups(heads: TowerHeads, lr: float, top_lr_scale: float, weight_decay: float) -> list[dict]:
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
def evaluate(heads: TowerHeads, split: _Split, device: torch.device, batch: int = 500) -> dict:
    """Recall@k of the current heads on a cached split (plain view, every caption)."""
    from retrieval.metrics import recall_at_k

    img, txt = _split_vectors(heads, split, device, batch)
    return recall_at_k(img.numpy(), txt.numpy(), split.text_to_image)


@torch.no_grad()
def _split_vectors(heads: TowerHeads, split: _Split, device: torch.device, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors of a split's images (plain view) and of all its captions, on the CPU."""
    heads.eval()
    n = len(split.records)
    img = torch.cat([heads.image(split.image_batch(slice(s, s + batch), 0, device)).float().cpu()
                     for s in range(0, n, batch)])
    txt = []
    for s in range(0, len(split.captions), batch):
        h, mask = split.text_batch(list(range(s, min(s + batch, len(split.captions)))), device)
        txt.append(heads.text(h, mask).float().cpu())
    return img, torch.cat(txt)


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def train_encoder(
    spec: str,
    train: Dataset,
    val: Dataset | None,
    out: Path,
    *,
    epochs: int = 15,
    batch_size: int = 256,
    lr: float = 1e-3,
    loss: str = "infonce",
    resume: bool = False,
    seed: int = 0,
    head: str = "linear",
    embed_dim: int = 256,
    image_top: int = 0,
    text_top: int = 0,
    image_backbones: str | list[str] = "lite0",
    top_lr_scale: float = 0.1,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    label_smoothing: float = 0.0,
    margin: float = 0.2,
    flip: bool | str = False,
    patience: int | None = 4,
    dropout: float = 0.1,
    max_captions: int | None = None,
    hubness_tau: float | None = None,
    cache_dir: Path | None = None,
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train `spec` (`towers` or `towers:TEXT_MODEL_DIR`) on `train`, select on `val`, save to `out`.

    Returns `out`, a model directory loadable with `load_encoder(out)` (best epoch by
    validation RSUM; the last epoch when `val` is None). `out/checkpoint.pt` holds the last
    finished epoch for `resume=True`. `flip=True` adds the mirrored images as a second view
    (doubles the one-off image feature caching; `flip="maps"` mirrors the cached maps instead).
    `image_backbones` names the EfficientNet-Lite backbones ("lite0,lite2": features concatenated).
    `max_captions` trains on at most that many captions per image (the first ones; fewer to cache).
    `hubness_tau` attaches querybank normalisation to the saved model, its banks drawn from the
    training pairs (`retrieval.encoders.querybank`); validation recall is logged with and without it. `image_top`/`text_top` unfreeze that many top
    blocks/layers, trained at `top_lr_scale` × lr. Images that are missing or unreadable are skipped and
    reported; a non-finite loss stops training with TrainingError, keeping the last good
    checkpoint and best model.
    """
    kind = spec.partition(":")[0]
    if kind != KIND:
        raise TrainingError(f"seesay can train the {KIND!r} encoder (optionally {KIND}:TEXT_MODEL_DIR), not {spec!r}")
    if loss not in ("infonce", "vse"):
        raise TrainingError(f"unknown loss {loss!r}; expected infonce or vse")
    if epochs < 1 or batch_size < 2:
        raise TrainingError("need at least 1 epoch and a batch of at least 2 pairs")
    out = Path(out)
    rank, world = _distributed()
    dev = torch.device(device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.manual_seed(seed)
    random.seed(seed)
    say = log if rank == 0 else (lambda _msg: None)
    runtime.keep_freed_memory()

    cfg = {**DEFAULT_CONFIG, **parse_spec(spec), "head": head, "embed_dim": embed_dim,
           "image_top": image_top, "text_top": text_top, "dropout": dropout,
           "image_backbones": image_backbones.split(",") if isinstance(image_backbones, str) else list(image_backbones)}
    base = TowersEncoder(cfg, spec=spec, device=dev)  # validates the text model, builds fresh heads
    cfg = base.cfg
    heads = base.heads.to(dev)

    say(f"caching frozen-tower features (train {len(train.records)} images)")
    tr = _Split(train, cfg, flip, cache_dir, say, "train", dev, max_captions)
    va = _Split(val, cfg, False, cache_dir, say, "val", dev) if val is not None and val.records else None
    skipped = tr.problems + (va.problems if va else [])
    for p in skipped[:20]:
        say(f"  {p}")
    if skipped:
        say(f"  {len(skipped)} image(s) skipped or without captions")

    ckpt_path = out / CHECKPOINT
    history: list[dict] = []
    start_epoch, best_rsum, since_best = 0, -math.inf, 0
    opt = torch.optim.AdamW(_param_groups(heads, lr, top_lr_scale, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = len(epoch_batches(len(tr.records), np.diff(tr.caption_start), batch_size * world, seed, 0))
    total_steps = steps_per_epoch * epochs
    warmup = int(round(warmup_epochs * steps_per_epoch))
    train_args = {"spec": spec, "epochs": epochs, "batch_size": batch_size, "lr": lr, "loss": loss, "seed": seed,
                  "top_lr_scale": top_lr_scale, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs,
                  "label_smoothing": label_smoothing, "margin": margin, "flip": flip, "patience": patience,
                  "max_captions": max_captions, "hubness_tau": hubness_tau,
                  "train_images": len(tr.records), "val_images": len(va.records) if va else 0}

    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state.get("cfg") != cfg:
            diff = {k: (state.get("cfg", {}).get(k), v) for k, v in cfg.items() if state.get("cfg", {}).get(k) != v}
            raise TrainingError(f"{ckpt_path} was trained with other settings (checkpoint vs now: {diff}); "
                                "use another --out or drop --resume")
        load_heads_state(heads, state["heads"], str(ckpt_path))
        opt.load_state_dict(state["optimizer"])
        start_epoch, best_rsum, since_best = state["epoch"] + 1, state["best_rsum"], state["since_best"]
        history = state["history"]
        say(f"resumed from {ckpt_path} after epoch {state['epoch'] + 1}")
    elif ckpt_path.is_file() and not resume:
        say(f"{out} holds an earlier run; starting afresh (pass resume=True to continue it)")

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    if dev.type == "cuda":
        tr.images = [m.pin_memory() for m in tr.images]

    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, epochs):
        if patience is not None and va is not None and since_best >= patience:
            say(f"early stop: no validation RSUM gain for {patience} epochs")
            break
        t0 = time.time()
        heads.train()
        losses = []
        for b, (img_idx, cap, view) in enumerate(
            epoch_batches(len(tr.records), np.diff(tr.caption_start), batch_size * world, seed, epoch, tr.n_views)
        ):
            # Each rank takes an equal slice of the global batch (all_gather needs equal sizes).
            per_rank = len(img_idx) // world
            sl = slice(rank * per_rank, (rank + 1) * per_rank)
            img_idx, cap, view = img_idx[sl], cap[sl], view[sl]
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * warmup_cosine(step, total_steps, warmup)
            x = tr.image_batch(img_idx, view, dev)
            h, mask = tr.text_batch((tr.caption_start[img_idx] + cap).tolist(), dev)
            with autocast:
                im, tx = heads.image(x), heads.text(h, mask)
                # Every rank scores the whole global batch; gradients flow through its own rows.
                im_all, _ = gather_with_grad(im)
                tx_all, _ = gather_with_grad(tx)
                if loss == "infonce":
                    value = infonce(im_all, tx_all, heads.logit_scale, label_smoothing)
                else:
                    value = vse_max_violation(im_all, tx_all, margin)
            if not torch.isfinite(value):
                raise TrainingError(
                    f"loss became {value.item()} at epoch {epoch + 1}, batch {b + 1}; stopped. "
                    f"The last good checkpoint is {ckpt_path if ckpt_path.is_file() else 'not written yet'}"
                    + (f" and the best model is in {out}" if (out / "encoder.json").is_file() else "")
                    + "; try a lower learning rate"
                )
            opt.zero_grad(set_to_none=True)
            value.backward()
            if world > 1:
                # Each rank holds the gradient through its own rows: their sum is the full
                # gradient. The temperature's gradient is already complete on every rank.
                for name, p in heads.named_parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        if name == "logit_scale":
                            p.grad /= world
            torch.nn.utils.clip_grad_norm_(heads.parameters(), 5.0)
            opt.step()
            clamp_logit_scale(heads.logit_scale)
            losses.append(value.item())
            step += 1
        entry: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"],
                                 "temperature": float(1 / heads.logit_scale.exp().item()), "train_s": round(time.time() - t0, 1)}
        improved = True
        if va is not None:
            r = evaluate(heads, va, dev)
            entry.update({"val_i2t_R@1": r["i2t"]["R@1"], "val_t2i_R@1": r["t2i"]["R@1"],
                          "val_i2t_R@5": r["i2t"]["R@5"], "val_t2i_R@5": r["t2i"]["R@5"], "val_rsum": r["rsum"]})
            improved = r["rsum"] > best_rsum
            if improved:
                best_rsum, since_best = r["rsum"], 0
            else:
                since_best += 1
        history.append(entry)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if improved:
                enc = TowersEncoder(cfg, heads=_cpu_copy(heads), spec=spec, device=torch.device("cpu"))
                enc.cfg["train"] = {**train_args, "best_epoch": epoch + 1, **{k: v for k, v in entry.items() if k.startswith("val_")}}
                enc.save(out)
            _save_checkpoint(ckpt_path, heads, opt, cfg, epoch, best_rsum, since_best, history)
            _write_log(out, history, skipped if epoch == start_epoch else None)
            say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items())
                + ("  *best*" if improved and va is not None else ""))
    if rank == 0:
        _plot(out / CURVE, history)
        if hubness_tau:
            _attach_querybank(out, tr, va, hubness_tau, seed, say)
    return out


def _attach_querybank(out: Path, tr: _Split, va: _Split | None, tau: float, seed: int, say: Callable) -> None:
    """Re-save the best model in `out` with a query bank from the training pairs; log validation recall with it."""
    from retrieval.encoders import querybank as qb
    from retrieval.evaluation import cross_modal_recall

    manifest = read_manifest(out)
    enc = TowersEncoder.from_saved(out, manifest["config"])
    enc._spec = manifest["spec"]
    cpu = torch.device("cpu")
    images, texts = _split_vectors(enc.heads, tr, cpu)
    enc.set_querybank(qb.fit(images, texts, tau, seed=seed))
    if va is not None:
        images, texts = _split_vectors(enc.heads, va, cpu)
        gallery_i = enc.querybank.with_bias(images.numpy(), "image")
        gallery_t = enc.querybank.with_bias(texts.numpy(), "caption")
        r = cross_modal_recall(enc, gallery_i, gallery_t, va.text_to_image)
        enc.cfg["train"].update({"hub_val_i2t_R@1": r["i2t"]["R@1"], "hub_val_t2i_R@1": r["t2i"]["R@1"],
                                 "hub_val_rsum": r["rsum"]})
        say(f"with hubness correction (tau {tau}): val i2t R@1 {r['i2t']['R@1']:.2f} t2i R@1 {r['t2i']['R@1']:.2f} "
            f"rsum {r['rsum']:.1f}")
    enc.save(out)


def _cpu_copy(heads: TowerHeads) -> TowerHeads:
    import copy

    return copy.deepcopy(heads).cpu().eval()


def _save_checkpoint(path, heads, opt, cfg, epoch, best_rsum, since_best, history) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"heads": {k: v.cpu() for k, v in heads.state_dict().items()}, "optimizer": opt.state_dict(),
                "cfg": cfg, "epoch": epoch, "best_rsum": best_rsum, "since_best": since_best, "history": history}, tmp)
    tmp.replace(path)


def check_checkpoint(directory: Path) -> dict:
    """The manifest of a saved towers model, or EncoderError when it is something else."""
    manifest = read_manifest(directory)
    if manifest["kind"] != KIND:
        raise EncoderError(f"{directory} holds a {manifest['kind']!r} encoder, not {KIND!r}")
    return manifest
