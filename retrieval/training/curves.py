"""A training run's record: the JSONL log (one line per epoch) and the learning-curve PNG."""
from __future__ import annotations

import json
from pathlib import Path

from indexer.files import write_atomic

LOG = "train_log.jsonl"
CURVE = "learning_curve.png"


def write_log(out: Path, history: list[dict], skipped: list[str] | None) -> None:
    """`out/train_log.jsonl`: the skipped inputs (when given) then one JSON object per epoch."""
    lines = [json.dumps(h) for h in history]
    if skipped:
        lines.insert(0, json.dumps({"skipped": skipped}))
    write_atomic(out / LOG, "\n".join(lines) + "\n")


def plot_curves(path: Path, history: list[dict]) -> None:
    """Loss and validation R@1 both ways per epoch, as a PNG."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(ep, [h["loss"] for h in history], marker="o")
    ax[0].set(title="training loss", xlabel="epoch")
    if "val_i2t_R@1" in history[0]:
        ax[1].plot(ep, [h["val_i2t_R@1"] for h in history], marker="o", label="image→text R@1")
        ax[1].plot(ep, [h["val_t2i_R@1"] for h in history], marker="o", label="text→image R@1")
        ax[1].legend()
    ax[1].set(title="validation recall", xlabel="epoch", ylabel="%")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
