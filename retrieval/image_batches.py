"""Image files → preprocessed tensor batches, decoded in worker processes ahead of the model."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torchvision import transforms

from retrieval.errors import BadImageError
from retrieval.images import ImageInput, load_rgb

Transform = Callable[..., torch.Tensor]  # PIL RGB image → (3, H, W) tensor
Finish = Callable[[torch.Tensor], torch.Tensor]  # a (B, 3, H, W) uint8 batch → the model's float input


def split_at_tensor(transform: Transform) -> tuple[Transform, Finish | None]:
    """Split a torchvision pipeline that ends in ToTensor (+ Normalize) in two.

    Returns (the PIL steps ending in a uint8 tensor, the float scaling + normalisation of a
    whole batch), or (transform, None) when it has another shape. The decode workers run the
    first part; the second runs where the model does. uint8 batches carry a quarter of the
    bytes between processes, into pinned memory and onto a GPU, and the workers skip two
    float passes per image.
    """
    steps = list(getattr(transform, "transforms", []))
    cut = next((i for i, step in enumerate(steps) if isinstance(step, transforms.ToTensor)), None)
    if cut is None or not all(isinstance(step, transforms.Normalize) for step in steps[cut + 1 :]):
        return transform, None
    tail = steps[cut + 1 :]

    def finish(x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255)  # what ToTensor does to 8-bit RGB
        for step in tail:
            x = step(x)
        return x

    return transforms.Compose(steps[:cut] + [transforms.PILToTensor()]), finish


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses one image per item; a bad file yields (zeros, reason)."""

    def __init__(self, images: Sequence[ImageInput], transform: Transform) -> None:
        self.images = list(images)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_rgb(self.images[i])), ""
        except BadImageError as exc:
            return self._blank(), exc.reason or "bad image"

    def _blank(self) -> torch.Tensor:
        from PIL import Image

        return torch.zeros_like(self.transform(Image.new("RGB", (32, 32))))


def image_batches(
    images: Sequence[ImageInput], batch_size: int, transform: Transform, workers: int = 2, pin: bool = False
) -> Iterator[tuple[int, torch.Tensor, list[str]]]:
    """Yield (start, tensor batch, reasons), decoding on `workers` processes a few batches ahead.

    Paths decode in worker processes; PIL images already in memory (or a corpus of one batch)
    are preprocessed in-process. `reasons[j]` is "" for a good image, else why it is bad
    (`bad_images` turns them into BadImageErrors naming the files). `pin` puts batches in page-locked memory for fast, asynchronous copies to a GPU.
    """
    items = list(images)
    if any(not isinstance(i, (str, Path)) for i in items) or len(items) <= batch_size:
        workers = 0
    loader = torch.utils.data.DataLoader(
        _ImageFiles(items, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    start = 0
    for x, reasons in loader:
        yield start, x, list(reasons)
        start += len(x)


def bad_images(images: Sequence[ImageInput], start: int, reasons: Sequence[str]) -> dict[int, BadImageError]:
    """{position in `images`: BadImageError naming the file} for the bad images of one batch."""
    return {start + j: BadImageError(images[start + j], reason) for j, reason in enumerate(reasons) if reason}
