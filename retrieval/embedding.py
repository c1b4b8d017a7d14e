"""Embedding a corpus in batches: decode image files on threads, skip and report bad ones."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from retrieval.encoders.base import Encoder
from retrieval.errors import BadImageError
from retrieval.images import ImageInput, batched, decode_many


def encode_image_files(
    encoder: Encoder,
    images: Sequence[ImageInput],
    batch_size: int = 64,
    workers: int = 2,
    advance: Callable[[int], None] = lambda _n: None,
) -> tuple[np.ndarray, list[int], dict[int, BadImageError]]:
    """Encode the decodable images: (vectors, positions of the encoded images, errors by position).

    Decoding runs on `workers` threads ahead of the model; `advance(n)` is called after each batch.
    The vectors are returned as the encoder gave them: callers check their width.
    """
    vectors: list[np.ndarray] = []
    kept: list[int] = []
    failed: dict[int, BadImageError] = {}
    for batch in batched(enumerate(decode_many(images, workers, lookahead=2 * batch_size)), batch_size):
        good = [(i, im) for i, im in batch if not isinstance(im, BadImageError)]
        failed.update((i, im) for i, im in batch if isinstance(im, BadImageError))
        if good:
            vectors.append(np.asarray(encoder.encode_images([im for _, im in good], batch_size), dtype=np.float32))
            kept.extend(i for i, _ in good)
        advance(len(batch))
    return (np.concatenate(vectors) if vectors else np.zeros((0, encoder.dim), dtype=np.float32)), kept, failed


def encode_captions(
    encoder: Encoder, texts: Sequence[str], batch_size: int = 256, advance: Callable[[int], None] = lambda _n: None
) -> np.ndarray:
    """Encode captions in batches, calling `advance(n)` after each; callers check the width, as for images."""
    chunks: list[np.ndarray] = []
    for batch in batched(texts, batch_size):
        chunks.append(np.asarray(encoder.encode_texts(batch, batch_size), dtype=np.float32))
        advance(len(batch))
    return np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), dtype=np.float32)
