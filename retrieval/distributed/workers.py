"""What runs on the Ray workers: decoding on CPU tasks, encoding in a pool of actors that each hold the encoder.

Rows arrive as batches of planned rows (id, kind, path, text). `decode_batch` turns each
image row's file into pixels the way the single-process path does (`load_rgb`, then the
encoder's own worker transform for a neural encoder); an image that cannot be read is
marked bad with its reason, never failing the batch. `EmbedActor` loads the encoder once
from its saved files and encodes a batch's good images and its captions.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from retrieval.distributed.jobfolder import shard_schema

from retrieval.errors import BadImageError
from retrieval.images import load_rgb

OK, BAD = "ok", "bad"
# A bad image's placeholder pixels: the encode stage skips it.
_NO_PIXELS = np.zeros((1, 1, 3), dtype=np.uint8)


def decode_batch(batch: dict[str, np.ndarray], transform: Callable | None = None) -> dict[str, Any]:
    """Add `pixels`, `status` and `reason` to a batch of planned rows; captions pass through.

    With a `transform` (a neural encoder's PIL → uint8 tensor step) the pixels are its
    output; without, the decoded RGB array, which the encoder gets back as a PIL image.
    """
    pixels, status, reason = [], [], []
    for kind, path in zip(batch["kind"], batch["path"]):
        if kind != "image":
            pixels.append(None)
            status.append(OK)
            reason.append("")
            continue
        try:
            image = load_rgb(path)
            pixels.append(np.asarray(transform(image)) if transform is not None else np.asarray(image))
            status.append(OK)
            reason.append("")
        except BadImageError as exc:
            pixels.append(None)
            status.append(BAD)
            reason.append(exc.reason or "bad image")
    shapes = {p.shape for p in pixels if p is not None}
    blank = np.zeros(next(iter(shapes)), dtype=np.uint8) if len(shapes) == 1 else _NO_PIXELS
    filled = [p if p is not None else blank for p in pixels]
    if len(shapes) == 1:
        column = np.stack(filled)
    else:  # images of different sizes: a column of arrays
        column = np.empty(len(filled), dtype=object)
        column[:] = filled
    return {**{k: batch[k] for k in ("id", "kind", "text")}, "pixels": column, "status": np.array(status), "reason": np.array(reason)}


def save_encoder_files(folder: Path) -> dict[str, bytes]:
    """A saved encoder folder's files by relative name, to ship to the actors (no shared filesystem needed)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


class EmbedActor:
    """Holds one encoder, rebuilt from its saved files, and encodes batches of decoded rows."""

    def __init__(self, files_ref: list, batch_size: int = 64) -> None:
        import ray

        from retrieval.encoders.registry import load_encoder

        files = ray.get(files_ref[0])
        self._folder = tempfile.TemporaryDirectory(prefix="seesay-encoder-")
        for name, data in files.items():
            path = Path(self._folder.name) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.encoder = load_encoder(Path(self._folder.name))  # verifies the weights against their digests
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["id"])
        vectors = np.zeros((n, self.encoder.dim), dtype=np.float32)
        kinds, status = batch["kind"], batch["status"]
        images = [i for i in range(n) if kinds[i] == "image" and status[i] == OK]
        captions = [i for i in range(n) if kinds[i] == "caption"]
        if images:
            vectors[images] = self._encode_images([batch["pixels"][i] for i in images])
        if captions:
            texts = [str(batch["text"][i]) for i in captions]
            vectors[captions] = np.asarray(self.encoder.encode_texts(texts, self.batch_size), dtype=np.float32)
        return shard_table(batch["id"], vectors, status, batch["reason"])

    def _encode_images(self, pixels: list[np.ndarray]) -> np.ndarray:
        if callable(getattr(self.encoder, "encode_image_tensors", None)):  # a neural encoder: uint8 tensors
            import torch

            out = [self.encoder.encode_image_tensors(torch.from_numpy(np.stack(pixels[s : s + self.batch_size])))
                   for s in range(0, len(pixels), self.batch_size)]
            return np.concatenate(out)
        from PIL import Image

        return np.asarray(self.encoder.encode_images([Image.fromarray(p) for p in pixels], self.batch_size), dtype=np.float32)


def worker_transform(encoder: Any) -> Callable | None:
    """The PIL → uint8 step a neural encoder's decode workers run, or None for any other encoder."""
    return getattr(encoder, "worker_transform", None)


def shard_table(ids: np.ndarray, vectors: np.ndarray, status: np.ndarray, reasons: np.ndarray) -> pa.Table:
    """Encoded rows in the shard schema (vectors as fixed-size lists, which any Parquet reader takes)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            "status": pa.array([str(s) for s in status], pa.string()),
            "reason": pa.array([str(r) for r in reasons], pa.string()),
        },
        schema=shard_schema(dim),
    )
