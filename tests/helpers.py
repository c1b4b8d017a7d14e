"""Test helpers shared by several files: the Flickr8k copy, the generated shape-set index, API calls."""
from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retrieval.collection import Collection
from retrieval.datasets import SHARED_FLICKR8K, Record, load_dataset
from retrieval.demo_data import make_shape_set
from retrieval.encoders.bow import BowConfig, fit_bow

REPO = Path(__file__).resolve().parents[1]
FLICKR8K = SHARED_FLICKR8K
needs_flickr8k = pytest.mark.skipif(not (FLICKR8K / "captions.csv").is_file(), reason=f"{FLICKR8K} is not here")


def shape_records(root: Path, copies: int = 2, seed: int = 0) -> list[Record]:
    """Records of a generated shape set (4 colours × 3 shapes × `copies` images, 2 captions each) under root."""
    return load_dataset(make_shape_set(root, copies=copies, seed=seed)).records


def build_shape_index(root: Path, copies: int = 2, splits: tuple[str, ...] = ()) -> Path:
    """A real index of generated shape images, embedded with a colour-words bag-of-words encoder; returns its folder.

    With `splits`, one shape set per split (seeded by its position) is indexed under that split,
    each image named "SPLIT/NAME"; without, one set from seed 0.
    """
    if splits:
        records = [
            replace(r, image_name=f"{split}/{r.image_name}", split=split)
            for seed, split in enumerate(splits)
            for r in shape_records(root / split, copies, seed)
        ]
    else:
        records = shape_records(root / "data", copies)
    encoder, problems = fit_bow(records, BowConfig(colours=16, objects=0))
    assert not problems
    with Collection.open_or_create(root / "index", encoder) as collection:
        report = collection.add(records, workers=1)
    assert report.images_added == len(records)
    return root / "index"


def local_client(app, **options) -> TestClient:
    """A test client that calls the app as a browser on this machine would: Host 127.0.0.1."""
    return TestClient(app, base_url="http://127.0.0.1", **options)


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def upload(client: TestClient, data: bytes, name: str = "query.png", mime: str = "image/png", **fields):
    """POST an image search with `fields` as form fields."""
    return client.post("/api/search/image", files={"file": (name, data, mime)}, data={k: str(v) for k, v in fields.items()})
