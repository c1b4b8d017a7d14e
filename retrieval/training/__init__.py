"""Contrastive training of encoders: settings, losses, cached frozen-tower features, the trainers."""
from __future__ import annotations

from retrieval.training.config import FinetuneConfig, TrainConfig, TrainingError


def train_encoder(*args, **kwargs):
    """See `retrieval.training.trainer.train_encoder` (imported lazily: it pulls in torch)."""
    from retrieval.training.trainer import train_encoder as _train

    return _train(*args, **kwargs)


__all__ = ["FinetuneConfig", "TrainConfig", "TrainingError", "train_encoder"]
