"""The image side shared by the neural encoders: one torch model over preprocessed tensors.

Subclasses provide `image_transform` (PIL → tensor) and `image_forward` (a batch on
`self.device` → vectors); this class runs them on the encoder's device (bfloat16 autocast on
a GPU), feeds the device from decoding worker processes, and L2-normalises the output. The
workers stop at uint8 pixels; scaling and normalisation run on the device
(`split_at_tensor`).
"""
from __future__ import annotations

from abc import abstractmethod
from functools import cached_property
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from retrieval import runtime
from retrieval.encoders.base import Encoder
from retrieval.errors import EncoderError
from retrieval.image_batches import Finish, Transform, bad_images, image_batches, split_at_tensor
from retrieval.images import ImageInput


class TorchImageEncoder(Encoder):
    """An Encoder whose images go through `image_transform` then `image_forward` on `device`."""

    device: torch.device
    image_transform: Transform

    @abstractmethod
    def image_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A preprocessed batch already on `self.device` → (B, dim) vectors (any scale)."""

    @cached_property
    def _split_transform(self) -> tuple[Transform, Finish | None]:
        return split_at_tensor(self.image_transform)

    @property
    def worker_transform(self) -> Transform:
        """What the decode workers run: PIL image → uint8 tensor (or `image_transform` whole)."""
        return self._split_transform[0]

    @torch.no_grad()
    def encode_image_tensors(self, x: torch.Tensor) -> np.ndarray:
        """A (B, 3, H, W) batch on any device → (B, dim) float32 unit rows.

        `x` is float, as `image_transform` makes it, or uint8, as the decode workers send it
        (then scaled and normalised here, on the device).
        """
        runtime.keep_freed_memory()
        x = self.model_input(x)
        with runtime.autocast(self.device):
            v = self.image_forward(x)
        return F.normalize(v.float(), dim=-1).cpu().numpy()

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch as the decode workers send it (uint8) or as `image_transform` makes it → float on the device."""
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            finish = self._split_transform[1]
            if finish is None:
                raise EncoderError(f"{self.spec} takes float image tensors made by its image_transform, not uint8")
            x = finish(x)
        return x

    def image_tensor_batches(self, images: Sequence[ImageInput], batch_size: int):
        """(start, batch, reasons) over `images`, decoded by as many workers as the device needs."""
        return image_batches(images, batch_size, self.worker_transform,
                             runtime.loader_workers(self.device), pin=self.device.type == "cuda")

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for start, x, reasons in self.image_tensor_batches(images, batch_size):
            bad = bad_images(images, start, reasons)
            if bad:
                raise next(iter(bad.values()))
            out[start : start + len(x)] = self.encode_image_tensors(x)
        return out
