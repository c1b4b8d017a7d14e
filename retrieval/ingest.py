"""Ingest: dataset records → hashed, encoded images and captions, as rows ready for `Index.add_vectors`.

Bad files are skipped with a problem line naming them, and so are their captions;
images and captions whose content hash is already indexed are not encoded again.
`Collection.add` runs this chunk by chunk and stores each chunk.
"""
from __future__ import annotations

import hashlib
import os
import stat
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from rich.progress import Progress

from indexer import NewItem
from retrieval.datasets import Record
from retrieval.embedding import encode_captions, encode_image_files
from retrieval.encoders.base import Encoder
from retrieval.errors import BadImageError, IndexMismatchError
from retrieval.progress import new_progress

COMMIT_EVERY = 8192

# Looks up committed item ids by content hash: (kind, hashes) -> {hash: id}.
KnownHashes = Callable[[str, Sequence[str]], dict[str, int]]


@dataclass
class AddReport:
    """What one `Index.add` call did, and each item it had to skip."""

    images_added: int = 0
    captions_added: int = 0
    images_skipped_existing: int = 0
    captions_skipped_existing: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for people."""
        line = (
            f"added {self.images_added} images and {self.captions_added} captions; "
            f"{self.images_skipped_existing} images and {self.captions_skipped_existing} captions "
            "were already indexed"
        )
        if self.problems:
            line += f"; {len(self.problems)} problems (bad files or empty captions, skipped)"
        return line


@dataclass
class NewImage:
    record: Record
    hash: str


@dataclass
class NewCaption:
    record: Record
    text: str
    hash: str
    image_hash: str


@dataclass
class Encoded:
    """One chunk of records, encoded: images and captions not yet indexed, with their vectors."""

    images: list[NewImage]
    image_vectors: np.ndarray
    captions: list[NewCaption]
    caption_vectors: np.ndarray

    def rows(self) -> list[NewItem]:
        """The rows to store, images first, in the order of `vectors()`."""
        images = [
            NewItem("image", new.record.image_name, new.hash, path=stored_path(new.record.image_path), split=new.record.split)
            for new in self.images
        ]
        captions = [
            NewItem(
                "caption", new.record.image_name, new.hash, text=new.text, split=new.record.split, image_hash=new.image_hash
            )
            for new in self.captions
        ]
        return images + captions

    def vectors(self) -> np.ndarray:
        """Image vectors, then caption vectors."""
        return np.concatenate([self.image_vectors, self.caption_vectors])


def stored_path(path: str | Path) -> str:
    """How an image file is recorded: absolute (not resolving links), so it opens from any working directory."""
    return os.path.abspath(path)


def under(path: str, folder: str) -> bool:
    """Whether stored path `path` is `folder` itself or lies inside it (both absolute)."""
    folder = folder.rstrip(os.sep) or os.sep
    return path == folder or path.startswith(folder if folder.endswith(os.sep) else folder + os.sep)


def file_hash(path: str | Path) -> str:
    """sha256 of a regular file's bytes; BadImageError naming the file when it cannot or must not be read.

    FIFOs, devices (a symlink to /dev/zero) and folders are refused from the open file's
    own status: opening without blocking, then checking, leaves no window in which the
    name could be swapped for something that never ends.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise BadImageError(path, "no such file") from exc
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise BadImageError(path, f"unreadable ({getattr(exc, 'strerror', None) or exc})") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise BadImageError(path, f"not a regular file ({_file_kind(mode)}): only regular files are read")
    with os.fdopen(fd, "rb") as handle:
        try:
            return hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as exc:
            raise BadImageError(path, f"unreadable ({exc.strerror or exc})") from exc


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def normalise_caption(text: str) -> str:
    """The form captions are compared in: NFC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def caption_hash(image_hash: str, text: str) -> str:
    """sha256 of the image's hash and the normalised caption."""
    return hashlib.sha256(f"{image_hash}\n{normalise_caption(text)}".encode()).hexdigest()


def _hash_or_error(path: str | Path) -> str | BadImageError:
    try:
        return file_hash(path)
    except BadImageError as exc:
        return exc


def _checked(vectors: np.ndarray, count: int, encoder: Encoder, dim: int) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (count, dim):
        raise IndexMismatchError(
            f"encoder {encoder.spec!r} returned vectors of shape {vectors.shape} for {count} items; "
            f"the index expects dim {dim}"
        )
    return vectors


class Meter:
    """Rich progress bars for images and captions; draws nothing when disabled."""

    def __init__(self, progress: Progress, n_records: int) -> None:
        self._progress = progress
        self._images = progress.add_task("images", total=n_records)
        self._captions = progress.add_task("captions", total=0)
        self._caption_total = 0

    @classmethod
    @contextmanager
    def shown(cls, enabled: bool, n_records: int) -> Iterator["Meter"]:
        """A meter over `n_records` records, live while the block runs."""
        with new_progress(enabled) as progress:
            yield cls(progress, n_records)

    def images_done(self, count: int) -> None:
        self._progress.advance(self._images, count)

    def captions_due(self, count: int) -> None:
        self._caption_total += count
        self._progress.update(self._captions, total=self._caption_total)

    def captions_done(self, count: int) -> None:
        self._progress.advance(self._captions, count)


def encode_chunk(
    records: Sequence[Record],
    encoder: Encoder,
    dim: int,
    known: KnownHashes,
    report: AddReport,
    meter: Meter,
    batch_size: int = 64,
    workers: int = 4,
) -> Encoded:
    """Hash, deduplicate, decode and encode one chunk; bad items go to `report.problems`."""
    hashed = hashed_records(records, workers, report)
    firsts = new_images(hashed, known)
    meter.images_done(len(records) - len(firsts))
    images, image_vectors, failed = _encode_images(firsts, encoder, dim, meter, batch_size, workers)
    captions = new_captions(hashed, firsts, {image_hash: err.reason for image_hash, err in failed.items()}, known, report)
    meter.captions_due(len(captions))
    caption_vectors = encode_captions(encoder, [caption.text for caption in captions], batch_size, meter.captions_done)
    return Encoded(images, image_vectors, captions, _checked(caption_vectors, len(captions), encoder, dim))


def new_images(hashed: Sequence[tuple[Record, str]], known: KnownHashes) -> dict[str, Record]:
    """{image hash: its first record} for the hashes `known` does not hold yet, in record order."""
    indexed = known("image", [image_hash for _, image_hash in hashed])
    firsts: dict[str, Record] = {}
    for record, image_hash in hashed:
        if image_hash not in indexed:
            firsts.setdefault(image_hash, record)
    return firsts


def new_captions(
    hashed: Sequence[tuple[Record, str]],
    firsts: dict[str, Record],
    failed: dict[str, str],
    known: KnownHashes,
    report: AddReport,
) -> list[NewCaption]:
    """The captions to add, in record order: none of bad images (`failed`: hash → reason), none empty, none indexed."""
    captions: list[NewCaption] = []
    for record, image_hash in hashed:
        if image_hash in failed:
            report.problems.append(bad_image_problem(record.image_name, record.image_path, failed[image_hash]))
            continue
        if firsts.get(image_hash) is not record:
            report.images_skipped_existing += 1
        for number, text in enumerate(record.captions, 1):
            if text.strip():
                captions.append(NewCaption(record, text, caption_hash(image_hash, text), image_hash))
            else:
                report.problems.append(f"{record.image_name}: caption {number} is empty")
    return _unindexed_captions(captions, known, report)


def bad_image_problem(image_name: str, path: str | Path, reason: str) -> str:
    """The problem line of an image that could not be decoded."""
    return f"{image_name}: bad image {path}: {reason}"


def hashed_records(records: Sequence[Record], workers: int, report: AddReport) -> list[tuple[Record, str]]:
    """(record, image file hash) for every record whose file can be read; the rest are problems."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        hashes = list(pool.map(_hash_or_error, [record.image_path for record in records]))
    good: list[tuple[Record, str]] = []
    for record, found in zip(records, hashes):
        if isinstance(found, BadImageError):
            report.problems.append(f"{record.image_name}: {found}")
        else:
            good.append((record, found))
    return good


def _encode_images(
    firsts: dict[str, Record], encoder: Encoder, dim: int, meter: Meter, batch_size: int, workers: int
) -> tuple[list[NewImage], np.ndarray, dict[str, BadImageError]]:
    """Decode and encode new images, decoding ahead of the model: (images, their vectors, errors by hash)."""
    pending = list(firsts.items())
    vectors, kept, failed = encode_image_files(
        encoder, [record.image_path for _, record in pending], batch_size, workers, meter.images_done
    )
    images = [NewImage(pending[i][1], pending[i][0]) for i in kept]
    return images, _checked(vectors, len(images), encoder, dim), {pending[i][0]: err for i, err in failed.items()}


def _unindexed_captions(captions: list[NewCaption], known: KnownHashes, report: AddReport) -> list[NewCaption]:
    """Captions whose hash is neither indexed nor repeated earlier in `captions`."""
    seen = set(known("caption", [caption.hash for caption in captions]))
    fresh: list[NewCaption] = []
    for caption in captions:
        if caption.hash in seen:
            report.captions_skipped_existing += 1
        else:
            seen.add(caption.hash)
            fresh.append(caption)
    return fresh

