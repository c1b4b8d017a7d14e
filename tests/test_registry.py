"""The encoder registry: one table of built-in kinds, and kinds other packages add through entry points."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from operator import attrgetter
from pathlib import Path

import pytest
from PIL import Image

from retrieval.encoders.base import Encoder
from retrieval.encoders.base import read_manifest
from retrieval.encoders.registry import ALIASES, KINDS, SHIPPED_MODELS, known_kinds, load_encoder
from retrieval.errors import EncoderError

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
import json
import numpy as np
from retrieval.encoders.base import Encoder, l2_normalize
from retrieval.images import load_rgb

WORDS = {"red": 0, "green": 1, "blue": 2}


class MeanColour(Encoder):
    """Image: its mean colour; text: the axis of its colour word (a third party's encoder)."""

    kind = "mean-colour"

    def __init__(self, dim=4):
        self._dim = dim

    @property
    def dim(self):
        return self._dim

    @property
    def spec(self):
        return f"mean-colour:{self._dim}"

    @classmethod
    def from_spec(cls, args):
        return cls(int(args or 4))

    def encode_images(self, images, batch_size=64, progress=False):
        out = np.zeros((len(images), self._dim), dtype=np.float32)
        for row, image in enumerate(images):
            out[row, :3] = np.asarray(load_rgb(image), dtype=np.float32).reshape(-1, 3).mean(axis=0)
        return l2_normalize(out)

    def encode_texts(self, texts, batch_size=256, progress=False):
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row, [WORDS[w] for w in text.split() if w in WORDS] or [3]] = 1.0
        return l2_normalize(out)

    def config(self):
        return {"dim": self._dim}

    def save_weights(self, directory):
        (directory / "words.json").write_text(json.dumps(WORDS))

    @classmethod
    def from_saved(cls, directory, config):
        return cls(config["dim"])
'''


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_row_of_the_table_names_what_its_module_holds(kind):
    entry = KINDS[kind]
    module = importlib.import_module(entry.module)
    assert issubclass(getattr(module, entry.cls), Encoder)
    if entry.factory:
        assert callable(attrgetter(entry.factory)(module))
    if entry.shipped:
        assert callable(attrgetter(entry.shipped)(module))
    if entry.text_queries:
        name, _, attr = entry.text_queries.partition(":")
        assert callable(getattr(importlib.import_module(name), attr))
    assert entry.summary


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_every_alias_names_a_shipped_folder_of_a_kind_that_ships(name):
    manifest = read_manifest(SHIPPED_MODELS / ALIASES[name].folder)
    assert KINDS[manifest["kind"]].shipped
    with pytest.raises(EncoderError, match=f"the {name} encoder takes no arguments"):
        load_encoder(f"{name}:x")


def test_a_kind_to_train_first_and_an_unknown_kind_are_clear_errors():
    with pytest.raises(EncoderError, match="must be trained first"):
        load_encoder("bow-pmi")
    with pytest.raises(EncoderError, match="unknown encoder 'nonesuch'.*default"):
        load_encoder("nonesuch")
    assert {"default", "fast", "towers-untrained", "openclip-random"} <= set(known_kinds())


def test_a_package_adds_an_encoder_through_an_entry_point(tmp_path):
    """An installed distribution declaring `[seesay.encoders] mean-colour = module:Class` indexes and searches from the CLI."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "seesay_mean_colour.py").write_text(PLUGIN)
    info = site / "seesay_mean_colour-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: seesay-mean-colour\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[seesay.encoders]\nmean-colour = seesay_mean_colour:MeanColour\n")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in [("red", (230, 10, 10)), ("blue", (10, 10, 230))]:
        Image.new("RGB", (16, 16), colour).save(photos / f"{name}.png")
        (photos / f"{name}.txt").write_text(f"something {name}")
    env = {"PYTHONPATH": f"{site}:{ROOT}", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}

    def seesay(*args):
        return subprocess.run([sys.executable, "-m", "cli.app", *map(str, args)], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=300)

    made = seesay("index", "--encoder", "mean-colour:5", "--data", photos, "--index", tmp_path / "i", "--json")
    assert made.returncode == 0, made.stderr
    found = seesay("search", "--index", tmp_path / "i", "blue", "-k", "1", "--json")
    assert found.returncode == 0, found.stderr
    assert Path(json.loads(found.stdout)["hits"][0]["path"]).name == "blue.png"
    listed = subprocess.run([sys.executable, "-c", "from retrieval.encoders.registry import known_kinds; print(known_kinds())"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert "mean-colour" in listed.stdout, listed.stderr
