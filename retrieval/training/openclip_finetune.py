"""Contrastive fine-tuning of open_clip models (`seesay train --encoder openclip:ARCH@PATH|ARCH/TAG|DIR`).

The same recipe as the towers trainer: one caption per image per batch (a random one each
epoch), symmetric InfoNCE with the model's own learnable logit scale (or the VSE++ hinge),
AdamW with linear warm-up and cosine decay, validation recall@k each epoch, the best epoch by
validation RSUM saved as a seesay encoder, a checkpoint per epoch for `resume`, a JSONL log and
a learning-curve PNG, bf16 autocast on a GPU and DistributedDataParallel under torchrun.

What trains (`FinetuneConfig`): the top `image_top` / `text_top` blocks of each tower (-1: the
whole tower; 0: only its final norm and projection), the k-th block from the top at
lr × layer_decay^k; `lock_image` freezes the whole image tower (LiT). What stays frozen below the
trained blocks runs once per image and caption, and is cached on disk keyed by the base
checkpoint's sha256 (`retrieval.training.openclip_towers`). The saved encoder records the base
checkpoint (spec and sha256) and these settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import torch

from indexer.files import atomic_path
from retrieval import runtime
from retrieval.cache import cache_dir as seesay_cache
from retrieval.datasets import Dataset
from retrieval.encoders.openclip import KIND, OpenClipEncoder, file_sha256
from retrieval.encoders.registry import load_encoder
from retrieval.image_batches import bad_images
from retrieval.metrics import RecallResult, recall_at_k
from retrieval.training import distributed
from retrieval.training.config import FinetuneConfig, TrainingError
from retrieval.training.curves import CURVE, plot_curves, write_log
from retrieval.training.data import PairSplit, captioned
from retrieval.training.features import cache_key, file_id, pad_tokens
from retrieval.training.loop import Progress, describe, train_one_epoch
from retrieval.training.losses import global_batch_loss
from retrieval.training.openclip_towers import ImageTower, TextTower, Towers, param_groups
from retrieval.training.schedule import Schedule

__all__ = ["CHECKPOINT", "FinetuneConfig", "TrainingError", "evaluate", "finetune_openclip"]

CHECKPOINT = "checkpoint.pt"
RESUMABLE_CHANGES = ("epochs", "patience")  # settings a resumed run may change

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data


class _Split(PairSplit):
    """A dataset split as the frozen bottoms' outputs: images (N, V, ...) and captions (ragged)."""

    def __init__(self, ds: Dataset, enc: OpenClipEncoder, towers: Towers, views: int, model_key: str,
                 cache: Path, name: str) -> None:
        records, self.problems = captioned(ds)
        images, bad = self._images(enc, towers.image, [r.image_path for r in records], views, model_key, cache)
        keep = self._keep(records, bad, name)
        self.images = images[keep]
        self.n_views = int(self.images.shape[1])
        self.tokens, self.offsets = self._texts(enc, towers.text, model_key, cache)

    @staticmethod
    def _images(enc: OpenClipEncoder, tower: ImageTower, paths: list[Path], views: int, model_key: str,
                cache: Path) -> tuple[torch.Tensor, dict[int, str]]:
        """(N, V, ...) bottom outputs (fp16; uint8 pixels when the whole tower trains) and {index: reason}."""
        mode = "pixels" if tower.full else ("locked" if tower.locked else f"cut{tower.cut}")
        path = cache / f"img-{mode}-v{views}-{cache_key([model_key, mode, views, [file_id(p) for p in paths]])}.pt"
        if not tower.full and path.is_file():
            data = torch.load(path, weights_only=True)
            return data["feats"], {int(k): v for k, v in data["bad"].items()}
        feats, bad, t0 = None, {}, time.time()
        for start, x, reasons in enc.image_tensor_batches(paths, 64):
            bad.update((i, err.reason or str(err)) for i, err in bad_images(paths, start, reasons).items())
            batch = [x, torch.flip(x, dims=[3])][:views]  # a centre crop mirrored = the mirrored image's crop
            if tower.full:
                out = torch.stack(batch, dim=1)
            else:
                with runtime.autocast(enc.device):
                    out = torch.stack([tower.bottom(enc.model_input(v)).half().cpu() for v in batch], dim=1)
            if feats is None:
                feats = torch.zeros((len(paths), *out.shape[1:]), dtype=out.dtype)
            feats[start : start + len(x)] = out
            log.info(f"  image inputs {start + len(x)}/{len(paths)} ({(start + len(x)) / (time.time() - t0):.1f} img/s)")
        feats = feats if feats is not None else torch.zeros((0, views), dtype=torch.float16)
        if not tower.full:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save({"feats": feats, "bad": {str(k): v for k, v in bad.items()}}, tmp)
        return feats, bad

    def _texts(self, enc: OpenClipEncoder, tower: TextTower, model_key: str,
               cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """Ragged bottom outputs of every caption, concatenated (T, ...), and their offsets (N+1,)."""
        key = cache_key([model_key, tower.cut, tower.full, hashlib.sha1("\n".join(self.captions).encode()).hexdigest()])
        path = cache / f"txt-{'ids' if tower.full else f'cut{tower.cut}'}-{key}.pt"
        if path.is_file():
            data = torch.load(path, weights_only=True)
            return data["rows"], data["offsets"]
        rows: list[torch.Tensor] = []
        for s in range(0, len(self.captions), 256):
            tokens = enc.tokenizer(self.captions[s : s + 256]).to(enc.device)
            with runtime.autocast(enc.device):
                rows += [r.cpu() if tower.full else r.half().cpu() for r in tower.bottom(tokens)]
        log.info(f"  caption inputs {len(rows)}")
        offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(torch.tensor([len(r) for r in rows]), 0)
        data = {"rows": torch.cat([r.reshape(len(r), -1) for r in rows]), "offsets": offsets}
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
        return data["rows"], data["offsets"]

    def text_batch(self, idx: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded inputs of captions `idx` and their lengths, on `device`."""
        if self.tokens.dtype == torch.long:  # whole-tower token ids: `context` ids per caption
            rows = torch.stack([self.tokens[self.offsets[i] : self.offsets[i + 1], 0] for i in idx])
            return rows.to(device), torch.full((len(idx),), rows.shape[1], device=device)
        rows, mask = pad_tokens(self.tokens, self.offsets, idx)
        return rows.to(device, non_blocking=True), mask.sum(dim=1).to(device)


@torch.no_grad()
def evaluate(towers: Towers, split: _Split, enc: OpenClipEncoder, batch: int = 256) -> RecallResult:
    """Recall@k of the current model on a split (plain view, every caption)."""
    device = enc.device
    towers.eval()
    img, txt = [], []
    with runtime.autocast(device):
        for s in range(0, len(split.images), batch):
            x = _image_input(split.images[s : s + batch, 0], towers, enc)
            img.append(torch.nn.functional.normalize(towers.image.top(x).float(), dim=-1).cpu())
        for s in range(0, len(split.captions), batch):
            rows, lengths = split.text_batch(list(range(s, min(s + batch, len(split.captions)))), device)
            txt.append(torch.nn.functional.normalize(towers.text.top(rows, lengths).float(), dim=-1).cpu())
    return recall_at_k(torch.cat(img).numpy(), torch.cat(txt).numpy(), split.text_to_image)


def _image_input(x: torch.Tensor, towers: Towers, enc: OpenClipEncoder) -> torch.Tensor:
    """A batch of stored image inputs as the image top takes them, on the device."""
    if towers.image.full:
        return enc.model_input(x)  # uint8 pixels → normalised floats
    return x.to(enc.device, non_blocking=True).float()


# ----------------------------------------------------------------------------- training


def base_encoder(spec: str | Path) -> tuple[OpenClipEncoder, dict[str, str]]:
    """The open_clip model to fine-tune and its record: {"spec", "sha256" of its checkpoint file}."""
    enc = load_encoder(spec)
    if not isinstance(enc, OpenClipEncoder):
        raise TrainingError(f"{spec} is a {enc.kind!r} encoder; this trainer fine-tunes {KIND} models")
    if enc.checkpoint_file is None or not enc.checkpoint_file.is_file():
        raise TrainingError(f"{spec} has no checkpoint file to start from (random weights?)")
    return enc, {"spec": str(spec), "sha256": file_sha256(enc.checkpoint_file)}


def finetune_openclip(spec: str | Path, train: Dataset, val: Dataset | None, out: Path,
                      config: FinetuneConfig = FinetuneConfig(), *, resume: bool = False,
                      cache_dir: Path | None = None) -> Path:
    """Fine-tune the open_clip model `spec` on `train`, select on `val`, save to `out` (returned).

    `out` is then a seesay encoder directory (the best epoch by validation RSUM; the last one
    without `val`) and `out/checkpoint.pt` the last finished epoch, which `resume=True`
    continues. Unreadable images are skipped and listed in the log; a non-finite loss stops
    with TrainingError, keeping the last good checkpoint and best model. Progress is logged
    (`logging`, rank 0 only under torchrun).
    """
    config.check()
    ranks = distributed.init_distributed()
    torch.manual_seed(config.seed)
    enc, base = base_encoder(spec)
    enc.device = ranks.device
    model = enc.model.to(ranks.device)
    towers = Towers(model, ImageTower(model, config.image_top, config.lock_image), TextTower(model, config.text_top))
    groups = param_groups(model, towers.image, towers.text, config.lr, config.layer_decay, config.weight_decay)
    tr, va, skipped = _splits(train, val, enc, towers, config, base, cache_dir)
    settings = {**dataclasses.asdict(config), "base": base, "train_images": len(tr.records),
                "val_images": len(va.records) if va else 0}
    opt = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    run = _Run(Path(out), settings, towers, opt, resume)
    if va is not None and not run.progress.history:
        run.baseline = evaluate(towers, va, enc)
        log.info(f"before training: val R@1 i2t={run.baseline.i2t['R@1']:.1f} t2i={run.baseline.t2i['R@1']:.1f}"
            f" rsum={run.baseline.rsum:.1f}")
    wrapped = distributed.wrap(towers, ranks, find_unused=config.loss == "vse")  # the hinge leaves the temperature unused
    schedule = Schedule(len(tr.batches(config.batch_size * ranks.world, config.seed, 0)), config.epochs, config.warmup_epochs)

    def inputs(images, captions, views) -> tuple:
        return (_image_input(tr.images[images, views], towers, enc), *tr.text_batch(tr.caption_ids(images, captions), ranks.device))

    def loss(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return global_batch_loss(image, text, model.logit_scale, config.loss, margin=config.margin)

    for epoch in range(run.progress.start_epoch, config.epochs):
        if run.progress.stop_early(config.patience, va is not None):
            log.info(f"early stop: no validation RSUM gain for {config.patience} epochs")
            break
        towers.train()
        entry = train_one_epoch(wrapped, tr.batches(config.batch_size * ranks.world, config.seed, epoch), inputs, loss, opt,
                                [p for g in groups for p in g["params"]], model.logit_scale, ranks, schedule, epoch,
                                run.where_good)
        result = evaluate(towers, va, enc) if va is not None else None
        run.finish_epoch(epoch, entry, result, enc, skipped if epoch == run.progress.start_epoch else None, ranks.main)
    if ranks.main:
        plot_curves(Path(out) / CURVE, run.progress.history)
    return Path(out)


def _splits(train: Dataset, val: Dataset | None, enc: OpenClipEncoder, towers: Towers, config: FinetuneConfig,
            base: dict[str, str], cache_dir: Path | None) -> tuple[_Split, _Split | None, list[str]]:
    """The training and validation splits as the frozen bottoms' outputs, and what was skipped (logged here)."""
    cache = Path(cache_dir) if cache_dir else seesay_cache("features", "openclip")
    model_key = cache_key([base["sha256"], enc.model_cfg])
    log.info(f"preparing inputs below the trained blocks (train {len(train.records)} images)")
    tr = _Split(train, enc, towers, 2 if config.flip else 1, model_key, cache, "train")
    va = _Split(val, enc, towers, 1, model_key, cache, "val") if val is not None and val.records else None
    skipped = tr.problems + (va.problems if va else [])
    for p in skipped[:20]:
        log.info(f"  {p}")
    return tr, va, skipped


class _Run:
    """The run's state across epochs and processes: its progress, the checkpoint and the saved model."""

    def __init__(self, out: Path, settings: dict, towers: Towers, opt: torch.optim.Optimizer, resume: bool) -> None:
        self.out, self.settings, self.towers, self.opt = out, settings, towers, opt
        self.ckpt = out / CHECKPOINT
        self.progress = Progress()
        self.baseline: RecallResult | None = None  # validation recall before training
        if resume and self.ckpt.is_file():
            self._resume()
        elif self.ckpt.is_file():
            log.info(f"{out} holds an earlier run; starting afresh (pass resume=True to continue it)")

    def _resume(self) -> None:
        state = torch.load(self.ckpt, map_location="cpu", weights_only=False)
        was, now = _fingerprint(state["settings"]), _fingerprint(self.settings)
        if was != now:
            diff = {k: (was.get(k), v) for k, v in now.items() if was.get(k) != v}
            raise TrainingError(f"{self.ckpt} was trained with other settings (checkpoint vs now: {diff}); "
                                "use another --out or drop --resume")
        self.towers.model.load_state_dict(state["trained"], strict=False)
        self.opt.load_state_dict(state["optimizer"])
        self.progress = Progress.from_checkpoint(state)
        self.baseline = RecallResult(**state["baseline"]) if state["baseline"] else None
        log.info(f"resumed from {self.ckpt} after epoch {state['epoch'] + 1}")

    def where_good(self) -> str:
        best = f" and the best model is in {self.out}" if (self.out / "encoder.json").is_file() else ""
        return f"The last good checkpoint is {self.ckpt if self.ckpt.is_file() else 'not written yet'}{best}"

    def finish_epoch(self, epoch: int, entry: dict, result: RecallResult | None, enc: OpenClipEncoder,
                     skipped: list[str] | None, main: bool) -> None:
        """Record the epoch; on rank 0 save the model when it is the best so far, then the checkpoint and log."""
        improved = self.progress.record(entry, result)
        if not main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if improved:
            self._save_model(enc, entry)
        trained = {n: p.detach().cpu() for n, p in self.towers.model.named_parameters() if p.requires_grad}
        with atomic_path(self.ckpt) as tmp:
            torch.save({"trained": trained, "optimizer": self.opt.state_dict(), "settings": self.settings,
                        **self.progress.state(epoch), "baseline": self.baseline and self.baseline.to_dict()}, tmp)
        write_log(self.out, self.progress.history, skipped)
        log.info(describe(entry, improved and result is not None))

    def _save_model(self, enc: OpenClipEncoder, entry: dict) -> None:
        base = self.settings["base"]
        train = {k: v for k, v in self.settings.items() if k != "base"}
        train.update(best_epoch=entry["epoch"], **{k: v for k, v in entry.items() if k.startswith("val_")})
        if self.baseline is not None:
            train["val_before"] = {"i2t_R@1": self.baseline.i2t["R@1"], "t2i_R@1": self.baseline.t2i["R@1"],
                                   "rsum": self.baseline.rsum}
        enc.mark_fine_tuned(self.out, {"base": base, "train": train})
        enc.save(self.out)


def _fingerprint(settings: dict) -> dict:
    """The settings a resumed run must share with the checkpoint (the base by its sha256, not its spelling)."""
    out = {k: v for k, v in settings.items() if k not in RESUMABLE_CHANGES}
    out["base"] = settings["base"]["sha256"]
    return out
