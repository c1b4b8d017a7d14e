"""Encoders: everything that turns images and captions into vectors in one shared space."""
from retrieval.encoders.base import Encoder
from retrieval.encoders.registry import load_encoder, register

__all__ = ["Encoder", "load_encoder", "register"]
