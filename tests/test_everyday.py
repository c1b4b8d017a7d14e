"""Everyday use from a shell: quiet commands, every image format Pillow reads, a clean build."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from cli.app import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def seesay(*args: object, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess, with this checkout first on the path."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run(
        [sys.executable, "-m", "cli.app", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def odd_pngs(folder: Path) -> None:
    """PNGs in the modes that make Pillow warn when converted carelessly, each with a sidecar caption."""
    folder.mkdir(parents=True)
    rgb = Image.new("RGB", (40, 40), (200, 30, 30))
    palette = rgb.quantize(colors=4)
    palette.save(folder / "palette.png", transparency=b"\x00\x40\xff\xff")  # transparency as bytes
    Image.new("LA", (40, 40), (90, 128)).save(folder / "grey-alpha.png")
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(folder / "sixteen-bit.png")
    Image.new("RGBA", (40, 40), (10, 10, 200, 100)).save(folder / "rgba.png")
    for name, caption in [("palette", "a red patch"), ("grey-alpha", "grey"), ("sixteen-bit", "light grey"), ("rgba", "a blue haze")]:
        (folder / f"{name}.txt").write_text(caption)


def test_a_plain_search_prints_results_and_nothing_else(tmp_path):
    odd_pngs(tmp_path / "pngs")
    made = seesay("index", "--data", tmp_path / "pngs", "--index", tmp_path / "i", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["images_added"] == 4
    assert "warn" not in made.stderr.lower(), made.stderr  # no PIL or library warnings while indexing
    found = seesay("search", "--index", tmp_path / "i", "a red patch", "-k", "2", "--json")
    assert found.returncode == 0 and found.stderr == ""
    assert len(json.loads(found.stdout)["hits"]) == 2


def test_a_folder_dataset_takes_every_format_pillow_decodes(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    names = ["a.tif", "b.TIFF", "c.ppm", "d.tga", "e.jp2", "f.qoi", "g.pcx", "h.jpg"]
    for shade, name in enumerate(names):
        Image.new("RGB", (24, 24), (30 * shade, 250 - 30 * shade, 90)).save(folder / name)
    (folder / "notes.md").write_text("not an image")
    (folder / "data.h5").write_bytes(b"\x89HDF\r\n\x1a\n")  # Pillow knows the name but cannot decode it
    made = runner.invoke(app, ["index", "--encoder", "test-colour:8", "--data", str(folder), "--index", str(tmp_path / "i"), "--json"])
    assert made.exit_code == 0, made.output
    report = json.loads(made.stdout)
    assert report["images_added"] == len(names) and report["problems"] == []


def test_the_package_builds_without_warnings_and_ships_its_data(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("retrieval", "indexer", "cli", "benchmarks"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheel", "."],
        capture_output=True, text=True, cwd=source, timeout=600,
    )
    assert built.returncode == 0, built.stderr
    assert "warning" not in (built.stdout + built.stderr).lower(), built.stdout + built.stderr
    (wheel,) = (tmp_path / "wheel").glob("seesay-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"retrieval/models/towers-flickr8k/encoder.json", "retrieval/server/static/index.html"} <= names
    assert not any(name.startswith("benchmarks/results/") for name in names)
