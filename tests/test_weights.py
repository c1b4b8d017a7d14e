"""Saved encoders are verified at load: tampered, truncated, swapped or extra weight files are refused by name."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.datasets import load_dataset
from retrieval.demo_data import make_shape_set
from retrieval.encoders.base import MANIFEST, verify_weights
from retrieval.encoders.bow import BowConfig, fit_bow
from retrieval.encoders.registry import load_encoder
from retrieval.encoders.towers import DEFAULT_MODEL_DIR
from retrieval.errors import EncoderError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    records = load_dataset(make_shape_set(root / "data", copies=1)).records
    encoder, _ = fit_bow(records, BowConfig(colours=8, objects=0))
    return encoder.save(root / "bow")


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "bow"))


def test_an_untouched_encoder_loads_and_records_each_file(copy):
    files = json.loads((copy / MANIFEST).read_text())["files"]
    assert "theta.npy" in files and set(files["theta.npy"]) == {"bytes", "sha256"}
    assert load_encoder(copy).dim > 0


def test_a_byte_changed_in_place_is_refused_by_name(copy):
    theta = copy / "theta.npy"
    data = bytearray(theta.read_bytes())
    data[-1] ^= 0xFF  # same size: only the digest can tell
    theta.write_bytes(bytes(data))
    with pytest.raises(EncoderError, match=r"theta\.npy does not match the sha256"):
        load_encoder(copy)


def test_truncated_weights_are_refused_by_name(copy):
    theta = copy / "theta.npy"
    theta.write_bytes(theta.read_bytes()[:100])
    with pytest.raises(EncoderError, match=r"theta\.npy is 100 bytes .* truncated"):
        load_encoder(copy)


def test_missing_files_are_named_and_other_files_left_alone(copy):
    (copy / "checkpoint.pt").write_bytes(b"a trainer's resume state, rewritten every epoch")
    assert load_encoder(copy).dim > 0
    (copy / "theta.npy").unlink()
    with pytest.raises(EncoderError, match=r"theta\.npy is missing"):
        load_encoder(copy)


def test_a_trainer_checkpoint_saved_first_is_not_recorded(tmp_path, saved):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"x" * 10)
    encoder = load_encoder(saved)
    encoder.save(folder)
    assert "checkpoint.pt" not in json.loads((folder / MANIFEST).read_text())["files"]
    assert not list(folder.glob(".saving-*"))
    (folder / "checkpoint.pt").write_bytes(b"y" * 20)
    assert load_encoder(folder).identity == encoder.identity


def test_unreadable_weights_without_a_record_are_one_clear_error(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["files"], manifest["digest"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    (copy / "theta.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(EncoderError, match=r"bow: cannot load"):
        load_encoder(copy)


def test_the_shipped_default_matches_its_record():
    verify_weights(DEFAULT_MODEL_DIR, json.loads((DEFAULT_MODEL_DIR / MANIFEST).read_text()))


def test_cli_on_an_index_with_truncated_encoder_weights_prints_one_line(saved, tmp_path):
    data = make_shape_set(tmp_path / "data", copies=1)
    index = tmp_path / "index"
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "cli.app", *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert run("index", "--encoder", saved, "--data", data, "--index", index, "--json").returncode == 0
    theta = index / "encoder" / "theta.npy"
    theta.write_bytes(theta.read_bytes()[:64])
    result = run("search", "--index", index, "a red square")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr, result.stderr
    assert "theta.npy" in result.stderr and "truncated" in result.stderr


def test_a_loader_that_fails_its_own_way_becomes_one_error(tmp_path, colour_encoder):
    folder = colour_encoder.save(tmp_path / "colour")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["config"] = {}  # from_saved needs "dim": a KeyError inside the loader
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EncoderError, match=r"colour: cannot load the saved test-colour encoder \(.*dim"):
        load_encoder(folder)
