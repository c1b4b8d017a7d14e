"""Embedding a corpus in batches: decode image files ahead of the model, skip and report bad ones."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from retrieval.encoders.base import Encoder
from retrieval.errors import BadImageError
from retrieval.images import ImageInput, batched, decode_many

if TYPE_CHECKING:  # importing it would load torch, which bag-of-words runs never need
    from retrieval.encoders.torch_image import TorchImageEncoder


def encode_image_files(
    encoder: Encoder,
    images: Sequence[ImageInput],
    batch_size: int = 64,
    workers: int = 2,
    advance: Callable[[int], None] = lambda _n: None,
) -> tuple[np.ndarray, list[int], dict[int, BadImageError]]:
    """Encode the decodable images: (vectors, positions of the encoded images, errors by position).

    A neural encoder (`TorchImageEncoder`) gets preprocessed tensors from decoding worker
    processes, as many as its device needs; any other encoder gets PIL images decoded on
    `workers` threads ahead of it. `advance(n)` is called after each batch. The vectors are
    returned as the encoder gave them: callers check their width.
    """
    if callable(getattr(encoder, "image_tensor_batches", None)):  # a TorchImageEncoder
        batches = _tensor_batches(encoder, images, batch_size)
    else:
        batches = _decoded_batches(encoder, images, batch_size, workers)
    vectors: list[np.ndarray] = []
    kept: list[int] = []
    failed: dict[int, BadImageError] = {}
    for positions, batch_vectors, batch_failed, size in batches:
        failed.update(batch_failed)
        if positions:
            vectors.append(batch_vectors)
            kept.extend(positions)
        advance(size)
    return (np.concatenate(vectors) if vectors else np.zeros((0, encoder.dim), dtype=np.float32)), kept, failed


Batch = tuple[list[int], "np.ndarray | None", dict[int, BadImageError], int]  # good positions, their vectors, errors, size


def _decoded_batches(encoder: Encoder, images: Sequence[ImageInput], batch_size: int, workers: int) -> Iterator[Batch]:
    """PIL images decoded on `workers` threads ahead of `encoder.encode_images`."""
    for batch in batched(enumerate(decode_many(images, workers, lookahead=2 * batch_size)), batch_size):
        good = [(i, im) for i, im in batch if not isinstance(im, BadImageError)]
        errors = {i: im for i, im in batch if isinstance(im, BadImageError)}
        found = np.asarray(encoder.encode_images([im for _, im in good], batch_size), dtype=np.float32) if good else None
        yield [i for i, _ in good], found, errors, len(batch)


def _tensor_batches(encoder: "TorchImageEncoder", images: Sequence[ImageInput], batch_size: int) -> Iterator[Batch]:
    """Preprocessed tensors from the encoder's decode workers, straight into its model."""
    from retrieval.image_batches import bad_images

    for start, x, reasons in encoder.image_tensor_batches(images, batch_size):
        good = [j for j, reason in enumerate(reasons) if not reason]
        found = encoder.encode_image_tensors(x if len(good) == len(x) else x[good]) if good else None
        yield [start + j for j in good], found, bad_images(images, start, reasons), len(x)


def encode_captions(
    encoder: Encoder, texts: Sequence[str], batch_size: int = 256, advance: Callable[[int], None] = lambda _n: None
) -> np.ndarray:
    """Encode captions in batches, calling `advance(n)` after each; callers check the width, as for images."""
    chunks: list[np.ndarray] = []
    for batch in batched(texts, batch_size):
        chunks.append(np.asarray(encoder.encode_texts(batch, batch_size), dtype=np.float32))
        advance(len(batch))
    return np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), dtype=np.float32)
