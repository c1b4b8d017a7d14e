"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """Multiplier of the base learning rate at `step` (0-based) of `total` steps."""
    if total <= 0:
        return 1.0
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """The learning rate of every optimiser step of a run: `warmup_epochs` of linear warm-up, then cosine decay.

    Each parameter group trains at its own `base_lr` times the multiplier.
    """

    def __init__(self, steps_per_epoch: int, epochs: int, warmup_epochs: float) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.total = steps_per_epoch * epochs
        self.warmup = int(round(warmup_epochs * steps_per_epoch))

    def step(self, epoch: int, batch: int) -> int:
        """The 0-based step of `batch` in `epoch`."""
        return epoch * self.steps_per_epoch + batch

    def set_lr(self, optimizer, step: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * warmup_cosine(step, self.total, self.warmup)
