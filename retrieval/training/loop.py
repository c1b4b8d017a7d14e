"""One epoch of contrastive training, and a run's record across epochs; both trainers share them.

Each step: this rank's slice of the global batch, the scheduled learning rate, the forward pass
under `runtime.autocast` (bf16 on a GPU), the loss of the global batch, a stop with
TrainingError on a non-finite loss, backward (`distributed.backward`), gradient clipping at
norm 5, the optimiser step, CLIP's clamp of the temperature.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from retrieval import runtime
from retrieval.metrics import RecallResult
from retrieval.training import distributed
from retrieval.training.config import TrainingError
from retrieval.training.distributed import Ranks
from retrieval.training.losses import clamp_logit_scale
from retrieval.training.schedule import Schedule

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # image indices, caption number within image, view


def train_one_epoch(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    inputs: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.nn.Parameter],
    logit_scale: torch.nn.Parameter,
    ranks: Ranks,
    schedule: Schedule,
    epoch: int,
    where_good: Callable[[], str],
) -> dict[str, Any]:
    """Train one epoch; its log entry: epoch (1-based), mean loss, last lr, temperature, seconds.

    `inputs(images, captions, views)` builds the model's arguments for this rank's pairs;
    `model(*inputs)` returns (image, text) unit vectors; `loss(image, text)` scores the global
    batch. `where_good()` says where the last good checkpoint and model are, for the error.
    """
    params = list(params)
    t0, losses = time.time(), []
    for b, (images, captions, views) in enumerate(batches):
        mine = ranks.local(len(images))
        schedule.set_lr(optimizer, schedule.step(epoch, b))
        args = inputs(images[mine], captions[mine], views[mine])
        with runtime.autocast(ranks.device):
            image, text = model(*args)
            value = loss(image, text)
        if not torch.isfinite(value):
            raise TrainingError(f"loss became {value.item()} at epoch {epoch + 1}, batch {b + 1}; stopped. "
                                f"{where_good()}; try a lower learning rate")
        optimizer.zero_grad(set_to_none=True)
        distributed.backward(value, ranks, logit_scale)
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        clamp_logit_scale(logit_scale)
        losses.append(value.item())
    return {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"],
            "temperature": float(1 / logit_scale.exp().item()), "train_s": round(time.time() - t0, 1)}


@dataclasses.dataclass
class Progress:
    """A run's record across epochs: the log entries, the best validation RSUM, epochs since it improved."""

    history: list[dict] = dataclasses.field(default_factory=list)
    start_epoch: int = 0
    best_rsum: float = -math.inf
    since_best: int = 0

    @classmethod
    def from_checkpoint(cls, state: dict) -> "Progress":
        """The record saved in a checkpoint (`state()` plus the trainer's own entries); training goes on after its epoch."""
        return cls(state["history"], state["epoch"] + 1, state["best_rsum"], state["since_best"])

    def state(self, epoch: int) -> dict[str, Any]:
        """What a checkpoint after `epoch` (0-based) keeps of the record."""
        return {"epoch": epoch, "best_rsum": self.best_rsum, "since_best": self.since_best, "history": self.history}

    def stop_early(self, patience: int | None, validating: bool) -> bool:
        return patience is not None and validating and self.since_best >= patience

    def record(self, entry: dict[str, Any], result: RecallResult | None) -> bool:
        """Add an epoch's entry (with its validation recall, when there is one); whether it is the best so far.

        Without validation every epoch counts as the best: the last one is kept.
        """
        improved = True
        if result is not None:
            entry.update({"val_i2t_R@1": result.i2t["R@1"], "val_t2i_R@1": result.t2i["R@1"],
                          "val_i2t_R@5": result.i2t["R@5"], "val_t2i_R@5": result.t2i["R@5"], "val_rsum": result.rsum})
            improved = result.rsum > self.best_rsum
            if improved:
                self.best_rsum, self.since_best = result.rsum, 0
            else:
                self.since_best += 1
        self.history.append(entry)
        return improved


def describe(entry: dict[str, Any], best: bool) -> str:
    """One log line for an epoch."""
    return (" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items())
            + ("  *best*" if best else ""))
