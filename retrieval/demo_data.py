"""A generated captioned image set where the right answer is known: coloured shapes on white (the demo's data and the tests')."""
from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}
SHAPES = ("square", "circle", "triangle")
# How much of the image a shape fills, as the margin left around it (a fraction of the side);
# copy i of a colour and shape is drawn at SIZES[i], so no two images share a caption.
SIZES = {"large": (0.05, 0.15), "small": (0.3, 0.35), "medium": (0.18, 0.23)}


def draw_shape(colour: str, shape: str, size: int = 64, seed: int = 0, extent: str = "large") -> Image.Image:
    """A `colour` `shape` on a white size×size image, as large as `extent` says (one of SIZES), jittered by `seed`."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    low, high = SIZES[extent]
    m = rng.randint(round(low * size), round(high * size))
    box = (m, m, size - m, size - m)
    fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[colour])
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fill)
    return image


def captions_for(colour: str, shape: str, extent: str) -> tuple[str, str]:
    """Two captions of one shape; a large one is the plain case, other sizes are named."""
    if extent == "large":
        return f"a {colour} {shape} on a white background", f"the {shape} is {colour}"
    return f"a {extent} {colour} {shape} on a white background", f"the {shape} is {colour} and {extent}"


def make_shape_set(directory: Path, copies: int = 3, fmt: str = "png", seed: int = 0, size: int = 64, count: int | None = None) -> Path:
    """Write copies × colours × shapes images of size×size pixels and a captions.csv (2 captions each); return the CSV.

    Copies of a colour and shape differ in size, and their captions say so: every caption
    describes one image only (at most len(SIZES) copies). With `count` (instead of `copies`):
    that many images, through every colour and shape, then every size, in turn (captions
    repeat after len(SIZES) × colours × shapes images), each drawn with its own jitter.
    """
    combos = [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))]
    if count is None:
        if not 1 <= copies <= len(SIZES):
            raise ValueError(f"copies must be 1..{len(SIZES)} so that every image has its own captions, got {copies}")
        drawn = [(c, s, i) for c, s in combos for i in range(copies)]
    elif count < 0:
        raise ValueError(f"count must be 0 or more, got {count}")
    else:
        drawn = [(*combos[n % len(combos)], n // len(combos)) for n in range(count)]
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    colours, extents = list(COLOURS), list(SIZES)
    rows = []
    for c, s, i in drawn:
        colour, shape, extent = colours[c], SHAPES[s], extents[i % len(extents)]
        name = f"{colour}_{shape}_{i}.{fmt}"
        draw_shape(colour, shape, size=size, seed=seed * 1000 + 100 * c + 10 * s + i, extent=extent).save(images / name)
        rows.extend((name, caption) for caption in captions_for(colour, shape, extent))
    path = directory / "captions.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return path
