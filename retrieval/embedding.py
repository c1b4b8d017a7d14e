"""Embedding a corpus in batches: decode image files on threads, skip and report bad ones."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from retrieval.encoders.base import Encoder, as_float32_rows
from retrieval.errors import BadImageError
from retrieval.images import ImageInput, batched, decode_many
from retrieval.progress import track


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


def encode_captions(encoder: Encoder, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """Encode captions in batches, checking the encoder's dimension."""
    chunks = [np.zeros((0, encoder.dim), dtype=np.float32)]
    for batch in track(batched(texts, batch_size * 8), len(texts), "encoding captions", progress):
        chunks.append(as_float32_rows(encoder.encode_texts(batch, batch_size), encoder.dim))
    return np.concatenate(chunks)
