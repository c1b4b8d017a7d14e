"""A generated captioned image set where the right answer is known: coloured shapes on white (the demo's data and the tests')."""
from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}
SHAPES = ("square", "circle", "triangle")


def draw_shape(colour: str, shape: str, size: int = 64, seed: int = 0) -> Image.Image:
    """A `colour` `shape` filling most of a white size×size image, jittered by `seed`."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    m = rng.randint(3, 10)
    box = (m, m, size - m, size - m)
    fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[colour])
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fill)
    return image


def make_shape_set(directory: Path, copies: int = 3, fmt: str = "png", seed: int = 0) -> Path:
    """Write copies × colours × shapes images and a captions.csv (2 captions each); return the CSV."""
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, colour in enumerate(COLOURS):
        for s, shape in enumerate(SHAPES):
            for i in range(copies):
                name = f"{colour}_{shape}_{i}.{fmt}"
                draw_shape(colour, shape, seed=seed * 1000 + 100 * c + 10 * s + i).save(images / name)
                rows.append((name, f"a {colour} {shape} on a white background"))
                rows.append((name, f"the {shape} is {colour}"))
    path = directory / "captions.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return path
