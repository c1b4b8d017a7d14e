"""The one image decode pipeline: bounded shapes, EXIF orientation, transparency over white."""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ColourMeanEncoder
from retrieval.embedding import encode_image_files
from retrieval.errors import BadImageError, ImageTooLargeError
from retrieval.images import MAX_ASPECT_RATIO, decode_bytes, load_rgb
from retrieval.server.thumbnails import render_thumbnail

ORIENTATION = 0x0112


def upright_photo() -> Image.Image:
    """A 60x30 image whose halves differ, so any rotation or flip shows."""
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, :30] = (220, 30, 30)
    pixels[:, 30:] = (30, 30, 220)
    pixels[:10, :] = (30, 200, 30)
    return Image.fromarray(pixels)


def with_orientation(path: Path, stored: Image.Image, orientation: int, fmt: str = "JPEG") -> Path:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored.save(path, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


# Orientation tag → how a camera stored the upright picture (the inverse of what a viewer applies).
STORED = {
    3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
    6: lambda im: im.transpose(Image.Transpose.ROTATE_90),
    8: lambda im: im.transpose(Image.Transpose.ROTATE_270),
    2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(tmp_path, orientation):
    upright = upright_photo()
    path = with_orientation(tmp_path / "rotated.png", STORED[orientation](upright), orientation, "PNG")
    decoded = load_rgb(path)
    assert decoded.size == upright.size
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(upright))


def test_a_rotated_jpeg_embeds_like_the_upright_one_and_its_thumbnail_is_upright(tmp_path):
    upright = upright_photo()
    plain = tmp_path / "upright.jpg"
    upright.save(plain, quality=95)
    rotated = with_orientation(tmp_path / "rotated.jpg", STORED[6](upright), 6)
    a, b = (np.asarray(load_rgb(p), dtype=float) for p in (plain, rotated))
    assert a.shape == b.shape and np.abs(a - b).mean() < 4  # JPEG noise only
    thumb = Image.open(io.BytesIO(render_thumbnail(rotated, 64)))
    assert thumb.width > thumb.height
    left, right = np.asarray(thumb.convert("RGB"))[20:, : thumb.width // 3].mean(axis=(0, 1)), np.asarray(
        thumb.convert("RGB")
    )[20:, -thumb.width // 3 :].mean(axis=(0, 1))
    assert left[0] > left[2] + 80 and right[2] > right[0] + 80  # red on the left, blue on the right


def transparent(mode: str) -> Image.Image:
    if mode == "RGBA":
        return Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    if mode == "LA":
        return Image.new("LA", (32, 32), (0, 0))
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    return palette


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_onto_white_for_encoding_and_thumbnails(tmp_path, mode):
    path = tmp_path / f"clear-{mode}.png"
    image = transparent(mode)
    image.save(path, transparency=0) if mode == "P" else image.save(path)
    assert load_rgb(path).getpixel((5, 5)) == (255, 255, 255)  # was black: alpha dropped
    assert load_rgb(transparent(mode)).getpixel((5, 5)) == (255, 255, 255)  # in-memory images too
    thumb = Image.open(io.BytesIO(render_thumbnail(path, 64))).convert("RGB")
    assert min(thumb.getpixel((5, 5))) > 245
    half = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    r, g, b = load_rgb(half).getpixel((1, 1))
    assert r == 255 and 120 < g < 135 and g == b  # half red over white


def test_a_20000x1_png_is_refused_before_decoding(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (20000, 1)).save(path)
    started = time.perf_counter()
    with pytest.raises(BadImageError, match="aspect ratio") as caught:
        load_rgb(path)
    assert time.perf_counter() - started < 1 and str(path) in str(caught.value)
    ok = tmp_path / "panorama.png"
    Image.new("RGB", (MAX_ASPECT_RATIO * 10, 10)).save(ok)
    assert load_rgb(ok).size == (MAX_ASPECT_RATIO * 10, 10)
    tall = tmp_path / "tall.png"
    Image.new("RGB", (1, MAX_ASPECT_RATIO + 1)).save(tall)
    with pytest.raises(BadImageError, match="aspect ratio"):
        load_rgb(tall)


def test_indexing_skips_the_strip_and_keeps_the_rest(tmp_path):
    strip, good = tmp_path / "strip.png", tmp_path / "good.png"
    Image.new("RGB", (20000, 1)).save(strip)
    Image.new("RGB", (16, 16), (200, 0, 0)).save(good)
    vectors, kept, failed = encode_image_files(ColourMeanEncoder(8), [strip, good], batch_size=2, workers=1)
    assert kept == [1] and vectors.shape == (1, 8)
    assert "aspect ratio" in failed[0].reason


def test_pixel_limit_from_the_header_and_summaries_without_decoder_text():
    big = io.BytesIO()
    Image.new("1", (3000, 3000)).save(big, "PNG")
    with pytest.raises(ImageTooLargeError, match="3000x3000"):
        decode_bytes(big.getvalue(), "big.png", max_pixels=1000 * 1000)
    with pytest.raises(BadImageError) as caught:
        decode_bytes(big.getvalue()[:200], "cut.png")
    assert caught.value.summary == "unreadable or truncated" and caught.value.reason != caught.value.summary
    with pytest.raises(BadImageError, match="empty"):
        decode_bytes(b"", "nothing.png")
    with pytest.raises(BadImageError, match="not an image"):
        decode_bytes(b"GIF89a" + b"\0" * 10, "x.png", formats=("PNG",))


def test_sixteen_bit_grey_keeps_its_range(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
    assert load_rgb(path).getpixel((0, 0)) == (156, 156, 156)  # 40000 >> 8, not clipped to 255


def test_fifos_and_devices_are_not_read(tmp_path):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.png"
    zero.symlink_to("/dev/zero")
    for path in (fifo, zero):
        with pytest.raises(BadImageError, match="not a regular file"):
            load_rgb(path)
