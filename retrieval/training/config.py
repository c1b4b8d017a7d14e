"""Training settings: one dataclass per trainer, the single source of their defaults.

`TrainConfig`'s defaults are the recipe of the shipped model (retrieval/models/towers-flickr8k:
15 epochs with early stopping after 4 flat ones, 1024-d linear heads over EfficientNet-Lite0 with
its top 4 blocks trained and MiniLM with its top layer trained, mirrored images as a second
view, a query bank with τ = 0.1 for hubness correction). `seesay train`'s option defaults,
`retrieval.training.reproduce` and library callers of `train_encoder` all read them from here.
No torch import: the CLI reads these defaults before anything heavy loads.
"""
from __future__ import annotations

import dataclasses

from retrieval.errors import SeesayError

LOSSES = ("infonce", "vse")
SHIPPED_SPEC = "towers"  # the `fast` shipped model's encoder spec (its text model: MiniLM); TrainConfig() is its recipe
DEFAULT_SPEC = "towers:mpnet"  # the `default` shipped model's encoder spec; DEFAULT_RECIPE is its recipe


class TrainingError(SeesayError):
    """Training cannot go on (bad data, diverged loss, incompatible checkpoint)."""


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    """What both trainers share: epochs, batches, optimiser schedule, what unfreezes, loss, views, stopping."""

    epochs: int = 15
    batch_size: int = 256  # pairs per batch, one caption per image (the global batch under torchrun)
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0
    image_top: int = 4  # top image blocks trained
    text_top: int = 1  # top text layers trained
    loss: str = "infonce"  # symmetric InfoNCE with a learnable temperature, or "vse" (max-violation hinge)
    margin: float = 0.2  # VSE++ hinge margin
    flip: bool | str = True  # the mirrored images as a second view
    patience: int | None = 4  # stop after this many epochs without a validation RSUM gain
    seed: int = 0

    def check(self) -> None:
        """TrainingError naming the first setting no run can use."""
        if self.loss not in LOSSES:
            raise TrainingError(f"unknown loss {self.loss!r}; expected infonce or vse")
        if self.epochs < 1 or self.batch_size < 2:
            raise TrainingError("need at least 1 epoch and a batch of at least 2 pairs")


@dataclasses.dataclass(frozen=True)
class TrainConfig(ContrastiveConfig):
    """Settings of a `towers` training run; the defaults are the shipped model's recipe.

    `flip="maps"` mirrors the cached feature maps instead of encoding the mirrored images
    (no second caching pass). `image_backbones` names EfficientNet-Lite backbones,
    comma-separated ("lite0,lite2": features concatenated). `max_captions` trains on at most
    that many captions per image (the first ones). `hubness_tau` attaches a query bank drawn
    from the training pairs to the saved model (None or 0: none).
    """

    head: str = "linear"  # projection head: linear, or mlp (a 2-layer MLP with a linear skip)
    embed_dim: int = 1024
    dropout: float = 0.1  # in the mlp head
    image_backbones: str = "lite0"
    top_lr_scale: float = 0.1  # unfrozen tower blocks train at this × lr
    label_smoothing: float = 0.0
    max_captions: int | None = None
    hubness_tau: float | None = 0.1

    def check(self) -> None:
        super().check()
        if self.flip not in (True, False, "maps"):
            raise TrainingError(f"flip must be true, false or 'maps', not {self.flip!r}")

    def backbones(self) -> list[str]:
        """`image_backbones` as a list of names."""
        return [b.strip() for b in self.image_backbones.split(",") if b.strip()]

    def model_config(self) -> dict:
        """The encoder-config entries these settings decide (the rest come from the towers themselves)."""
        return {"head": self.head, "embed_dim": self.embed_dim, "image_top": self.image_top,
                "text_top": self.text_top, "dropout": self.dropout, "image_backbones": self.backbones()}


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(ContrastiveConfig):
    """Settings of an open_clip fine-tuning run: `ContrastiveConfig` plus layer-wise decay and LiT.

    image_top/text_top count the top blocks of each tower trained (-1: the whole tower; 0: only
    its final norm and projection).
    """

    lr: float = 1e-5  # heads (projections, final norms) and temperature; blocks get less
    layer_decay: float = 0.75  # the k-th block from the top trains at lr × layer_decay^k
    weight_decay: float = 0.1
    lock_image: bool = False  # LiT: the image tower frozen whole (image_top is ignored)
    flip: bool = True


# The `default` shipped model (retrieval/models/lite02-mpnet-flickr8k): TrainConfig() with Lite0 + Lite2
# backbones and 8 epochs (patience 3), trained as DEFAULT_SPEC; its zero-shot weight (0.4) and query bank
# (τ = 0.05) were set after training (benchmarks/RESULTS.md).
DEFAULT_RECIPE = dataclasses.replace(TrainConfig(), image_backbones="lite0,lite2", epochs=8, patience=3)
