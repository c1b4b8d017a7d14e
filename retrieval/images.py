"""Decoding image files into RGB PIL images, with clear errors and a decompression-bomb guard."""
from __future__ import annotations

import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

from PIL import Image, UnidentifiedImageError

from retrieval.errors import BadImageError

ImageInput = Union[str, Path, Image.Image]

# Pillow's guard against decompression bombs stays on; we turn its warning into an error too.
MAX_IMAGE_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def load_rgb(image: ImageInput) -> Image.Image:
    """Return `image` as a fully decoded RGB image; raise BadImageError naming the file otherwise."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise BadImageError(path, "no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(path, f"too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise BadImageError(path, "not an image file") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(path, f"unreadable or truncated ({exc})") from exc


def decode_many(
    images: Sequence[ImageInput], workers: int = 2, lookahead: int = 64
) -> Iterator[Union[Image.Image, BadImageError]]:
    """Decode images in order on a thread pool, yielding each image or the BadImageError it raised.

    At most `lookahead` images are decoded ahead of the consumer, so decoding overlaps the
    caller's work (the model releases the GIL) without holding a whole corpus in memory.
    """

    def attempt(item: ImageInput) -> Union[Image.Image, BadImageError]:
        try:
            return load_rgb(item)
        except BadImageError as exc:
            return exc

    if workers <= 1:
        yield from map(attempt, images)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in images:
            pending.append(pool.submit(attempt, item))
            if len(pending) >= lookahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Split an iterable into lists of at most `size` items."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
