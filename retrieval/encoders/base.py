"""The one interface every encoder implements, and its on-disk format.

An encoder maps images and captions into one d-dimensional space in which the
inner product is the retrieval score (neural encoders L2-normalise, so it is the
cosine; the bag-of-words encoders document their own scaling). A saved encoder
is a directory holding `encoder.json` ({"kind", "version", "spec", "dim",
"config"}) plus whatever weight files the kind needs; `load_encoder(DIR)`
reopens it whatever the kind.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence

import numpy as np

from indexer.files import write_atomic
from retrieval.errors import EncoderError
from retrieval.images import ImageInput

MANIFEST = "encoder.json"


class TextQueries(Protocol):
    """What turns text queries into search rows: any Encoder, or a kind's lighter text-only path."""

    digest: str | None

    @property
    def dim(self) -> int: ...

    def encode_text_queries(self, texts: Sequence[str], cross_modal: bool) -> np.ndarray: ...


class Encoder(ABC):
    """Images and texts → float32 vectors whose inner product is the score."""

    kind: ClassVar[str]
    version: ClassVar[int] = 1
    digest: str | None = None  # sha256 of the saved weight files, set by save() and load_encoder()

    @property
    @abstractmethod
    def dim(self) -> int:
        """Length of every vector this encoder returns."""

    @property
    def spec(self) -> str:
        """A string that names this encoder (registry spec, or the saved directory)."""
        return self.kind

    @property
    def identity(self) -> str:
        """The spec plus the weights' digest: two encoders with equal identity give equal vectors."""
        return f"{self.spec}#{self.digest[:16]}" if self.digest else self.spec

    @abstractmethod
    def encode_images(
        self, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Encode PIL images or image paths into an (n, dim) float32 array.

        A path that cannot be decoded raises BadImageError naming it; callers that
        must skip bad files decode first with `retrieval.images.decode_many`.
        """

    @abstractmethod
    def encode_texts(
        self, texts: Sequence[str], batch_size: int = 256, progress: bool = False
    ) -> np.ndarray:
        """Encode captions into an (n, dim) float32 array."""

    def as_queries(self, vectors: np.ndarray, cross_modal: bool) -> np.ndarray:
        """Encoded rows (as stored in an index) → the rows to search with.

        `cross_modal`: text → image or image → caption. Identity for most encoders; a
        hubness-corrected encoder stores a bias as the last coordinate and marks queries so
        that only cross-modal scores subtract it (`retrieval.encoders.querybank`).
        """
        return vectors

    def encode_text_queries(self, texts: Sequence[str], cross_modal: bool) -> np.ndarray:
        """Captions → the rows to search with: `as_queries` of `encode_texts`.

        `cross_modal`: searching images. A kind may offer a lighter object with this method
        and `dim` for queries alone (`registry.load_text_queries`).
        """
        return self.as_queries(self.encode_texts(list(texts)), cross_modal)

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings that `from_saved` needs besides the weight files."""

    @abstractmethod
    def save_weights(self, directory: Path) -> None:
        """Write this encoder's weight files into `directory`."""

    @classmethod
    @abstractmethod
    def from_saved(cls, directory: Path, config: dict[str, Any]) -> "Encoder":
        """Rebuild an encoder from `config` and the weight files in `directory`."""

    def save(self, directory: str | Path) -> Path:
        """Save into `directory` (created if needed): encoder.json plus weights."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Weights are written apart first, so the record lists exactly them and not what else
        # shares the folder (a trainer's checkpoint.pt, rewritten every epoch).
        with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as staging:
            self.save_weights(Path(staging))
            self.digest, files = _digests(Path(staging))
            for name in files:
                (directory / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(staging) / name, directory / name)
        manifest = {
            "kind": self.kind,
            "version": self.version,
            "spec": self.spec,
            "dim": self.dim,
            "digest": self.digest,
            "files": files,
            "config": self.config(),
        }
        write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2))
        return directory


def weights_digest(directory: Path) -> str:
    """sha256 over the names and bytes of a saved encoder's files (encoder.json aside)."""
    return _digests(directory)[0]


def _digests(directory: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """(sha256 over every file's name and bytes, {name: {"bytes", "sha256"}}), reading each file once."""
    whole = hashlib.sha256()
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file() and not p.name.startswith(MANIFEST)):
        whole.update(str(path.relative_to(directory)).encode())
        one = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                whole.update(block)
                one.update(block)
        files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": one.hexdigest()}
    return whole.hexdigest(), files


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_weights(directory: Path, manifest: dict[str, Any], only: Sequence[str] | None = None) -> None:
    """Check a saved encoder's weight files against encoder.json's record; EncoderError naming the file if not.

    The record (`files`: {name: {"bytes", "sha256"}}) lists what `save_weights` wrote;
    other files in the folder are not the encoder's and are left alone. Encoders saved
    before the record existed are not checked: their `digest` covered whatever shared
    the folder at the time, so it cannot tell tampering from a trainer's checkpoint.
    `only`: check just these files (those a caller reads), not every one recorded.
    """
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        return
    directory = Path(directory)
    for name, record in sorted(listed.items()):
        if only is not None and name not in only:
            continue
        path = directory / name
        if not path.is_file():
            raise EncoderError(f"{path} is missing: {MANIFEST} records it as part of this encoder")
        size = path.stat().st_size
        if not isinstance(record, dict) or size != record.get("bytes"):
            raise EncoderError(
                f"{path} is {size} bytes but {MANIFEST} records {record.get('bytes') if isinstance(record, dict) else '?'}: "
                "the weights are truncated or were replaced"
            )
        if _file_sha256(path) != record.get("sha256"):
            raise EncoderError(f"{path} does not match the sha256 {MANIFEST} records: the weights were altered or swapped")


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read a saved encoder's encoder.json, with a clear error when it is absent or broken."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise EncoderError(f"{directory} is not a saved seesay encoder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
        manifest["kind"], manifest["dim"]
    except (ValueError, KeyError, TypeError) as exc:
        raise EncoderError(f"{path} is not a valid encoder manifest: {exc}") from exc
    return manifest


def as_float32_rows(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Check shape (n, dim) and return a C-contiguous float32 copy-or-view."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise EncoderError(f"expected vectors of shape (n, {dim}), got {vectors.shape}")
    return vectors


def l2_normalize(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scale each row to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, eps)).astype(np.float32, copy=False)
