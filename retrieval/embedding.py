"""Embedding a corpus in batches: decode image files on threads, skip and report bad ones."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from retrieval.encoders.base import Encoder, as_float32_rows
from retrieval.errors import BadImageError
from retrieval.images import ImageInput, batched, decode_many
from retrieval.progress import track


def encode_image_files(
    encoder: Encoder, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = False, workers: int = 2
) -> tuple[np.ndarray, list[int], list[str]]:
    """Encode the decodable images; return (vectors, positions of the encoded images, problems)."""
    vectors = [np.zeros((0, encoder.dim), dtype=np.float32)]
    kept: list[int] = []
    problems: list[str] = []
    decoded = enumerate(decode_many(images, workers))
    for batch in track(batched(decoded, batch_size), len(images), "encoding images", progress):
        good = [(i, im) for i, im in batch if not isinstance(im, BadImageError)]
        problems.extend(str(im) for _, im in batch if isinstance(im, BadImageError))
        if good:
            vectors.append(as_float32_rows(encoder.encode_images([im for _, im in good], batch_size), encoder.dim))
            kept.extend(i for i, _ in good)
    return np.concatenate(vectors), kept, problems


def encode_captions(encoder: Encoder, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """Encode captions in batches, checking the encoder's dimension."""
    chunks = [np.zeros((0, encoder.dim), dtype=np.float32)]
    for batch in track(batched(texts, batch_size * 8), len(texts), "encoding captions", progress):
        chunks.append(as_float32_rows(encoder.encode_texts(batch, batch_size), encoder.dim))
    return np.concatenate(chunks)
