"""Shared test helpers: a tiny colour encoder and real image files made with Pillow."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
from PIL import Image

from retrieval.encoders.base import Encoder, l2_normalize
from retrieval.encoders.registry import register
from retrieval.images import load_rgb

COLOUR_WORDS = {"red": 0, "green": 1, "blue": 2}


class ColourMeanEncoder(Encoder):
    """Image → unit mean RGB padded with zeros; text → the unit axis of its colour word.

    Text without a colour word maps to the first padding axis, so it matches no image.
    """

    kind = "test-colour"

    def __init__(self, dim: int = 8) -> None:
        if dim < 4:
            raise ValueError("ColourMeanEncoder needs dim >= 4")
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self._dim}"

    def encode_images(self, images: Sequence, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(images), self._dim), dtype=np.float32)
        for row, image in enumerate(images):
            out[row, :3] = np.asarray(load_rgb(image), dtype=np.float32).reshape(-1, 3).mean(axis=0)
        return l2_normalize(out)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            hits = [COLOUR_WORDS[w] for w in text.lower().split() if w in COLOUR_WORDS]
            out[row, hits or [3]] = 1.0
        return l2_normalize(out)

    def config(self) -> dict[str, Any]:
        return {"dim": self._dim}

    def save_weights(self, directory: Path) -> None:
        (directory / "colours.json").write_text(json.dumps(COLOUR_WORDS))

    @classmethod
    def from_saved(cls, directory: Path, config: dict[str, Any]) -> "ColourMeanEncoder":
        return cls(int(config["dim"]))


register(ColourMeanEncoder.kind, ColourMeanEncoder, lambda args: ColourMeanEncoder(int(args or 8)))


def solid_image(path: Path, rgb: tuple[int, int, int], size: int = 16) -> Path:
    """Write a solid-colour image (format from the suffix) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)
    return path


@pytest.fixture
def colour_encoder() -> ColourMeanEncoder:
    return ColourMeanEncoder(8)


@pytest.fixture(scope="session")
def towers_encoder():
    """Untrained 16-d MLP heads on EfficientNet-Lite0 and MiniLM, top block and layer trainable: built once a session."""
    from retrieval.encoders.towers import TowersEncoder

    return TowersEncoder({"embed_dim": 16, "head": "mlp", "image_top": 1, "text_top": 1})


@pytest.fixture(scope="session")
def zeroshot_encoder():
    """The `zeroshot` encoder (EfficientNet-Lite0 class probabilities in MiniLM's space): built once a session."""
    from retrieval.encoders.registry import load_encoder

    return load_encoder("zeroshot")


@pytest.fixture(scope="session")
def shape_index(tmp_path_factory) -> Path:
    """One index of 24 generated shape images (2 captions each) for the whole session: open it read-only.

    A test that changes an index builds its own with `helpers.build_shape_index`.
    """
    from helpers import build_shape_index  # not at the top: crash tests import this file in subprocesses

    return build_shape_index(tmp_path_factory.mktemp("shape-index"))


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for this test session (skips, saying why, where none can run)."""
    from benchmarks.postgres import TemporaryServer, available

    reason = available()
    if reason:
        pytest.skip(f"no PostgreSQL: {reason}")
    server = TemporaryServer()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def new_db_url(request):
    """Makes, per call, where a new index keeps its metadata: the default SQLite file (None) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return lambda: None
    return request.getfixturevalue("postgres").new_database


@pytest.fixture
def db_url(new_db_url) -> str | None:
    """Where an index test keeps its metadata: the default SQLite file (None), or a fresh PostgreSQL database."""
    return new_db_url()
