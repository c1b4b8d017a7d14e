"""Decoding images into RGB PIL images: one pipeline for files, uploads and thumbnails.

Every image seesay reads goes through `decode_image`: the size and shape are checked
from the header before any pixel is decoded (Pillow's decompression-bomb guard stays on
too), EXIF orientation is applied, and transparency is composited onto white.
"""
from __future__ import annotations

import io
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from retrieval.errors import BadImageError, ImageTooLargeError

ImageInput = Union[str, Path, Image.Image]

# Pillow's guard against decompression bombs stays on; we turn its warning into an error too.
MAX_IMAGE_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Longest side over shortest side. Encoders scale the shorter side to ~224 pixels, so a
# 20000x1 strip would become a billion-pixel image; panoramas stay far below this.
MAX_ASPECT_RATIO = 50
# What transparent pixels become: encoders and JPEG thumbnails see them over white.
BACKGROUND = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112


def check_shape(width: int, height: int, name: object, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse sizes whose decoding or encoding would cost more than a bounded amount."""
    if width * height > max_pixels:
        raise ImageTooLargeError(name, f"{width}x{height} pixels is over the limit of {max_pixels} pixels")
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise BadImageError(
            name, f"{width}x{height} pixels: the aspect ratio is over the limit of {MAX_ASPECT_RATIO}:1"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB, with any transparency (alpha channel or palette/colour key) composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):  # 16-bit grey: keep the top 8 bits rather than clip at 255
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(
    source: str | Path | BinaryIO,
    name: object = None,
    *,
    formats: Sequence[str] | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decode a file or file object into an upright RGB image; BadImageError naming `name` otherwise."""
    name = source if name is None else name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=formats) as img:
                check_shape(*img.size, name, max_pixels)
                img.load()
                if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                    ImageOps.exif_transpose(img, in_place=True)
                return to_rgb(img) if img.mode != "RGB" else img.copy()
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(name, "too large to decode safely", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise BadImageError(name, "not an image file") from exc
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError, ZeroDivisionError) as exc:
        # Pillow's plugins raise all of these on malformed headers and truncated data.
        raise BadImageError(name, "unreadable or truncated", str(exc) or type(exc).__name__) from exc


def decode_bytes(
    data: bytes, name: object, *, formats: Sequence[str] | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode image bytes (an upload) like a file: the same checks, orientation and flattening."""
    if not data:
        raise BadImageError(name, "empty: send an image file")
    return decode_image(io.BytesIO(data), name, formats=formats, max_pixels=max_pixels)


def load_rgb(image: ImageInput) -> Image.Image:
    """Return `image` as a fully decoded RGB image; raise BadImageError naming the file otherwise."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    path = Path(image)
    if not path.is_file():
        raise BadImageError(path, "not a regular file" if path.exists() else "no such file")
    return decode_image(path)


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
