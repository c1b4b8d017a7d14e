"""Contrastive training of encoders: losses, cached frozen-tower features, the trainer."""
from __future__ import annotations


def train_encoder(*args, **kwargs):
    """See `retrieval.training.trainer.train_encoder` (imported lazily: it pulls in torch)."""
    from retrieval.training.trainer import train_encoder as _train

    return _train(*args, **kwargs)


__all__ = ["train_encoder"]
