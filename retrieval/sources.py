"""Where an index's images came from: the datasets `seesay index` read, kept so `seesay update` can read them again.

They live in DIR/sources.json beside the index (the storage engine does not look at it),
one entry per distinct dataset, with absolute paths.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from indexer.files import write_atomic
from retrieval.datasets import Dataset, load_dataset
from retrieval.errors import BadDataError

SOURCES_JSON = "sources.json"


@dataclass(frozen=True)
class Source:
    """A dataset as `seesay index` was given it."""

    data: str
    images: Optional[str] = None
    split: Optional[str] = None
    split_file: Optional[str] = None
    allow_outside_images: bool = False

    @classmethod
    def given(
        cls, data: Path, images: Optional[Path], split: Optional[str], split_file: Optional[Path], allow_outside_images: bool = False
    ) -> "Source":
        """The source for these command-line arguments, its paths made absolute."""
        absolute = lambda path: None if path is None else os.path.abspath(path)  # noqa: E731
        return cls(absolute(data), absolute(images), split, absolute(split_file), allow_outside_images)

    @property
    def folder(self) -> str:
        """The folder its images live under: the folder dataset itself, or the file's images root."""
        if self.images is not None:
            return self.images
        data = Path(self.data)
        if data.is_dir():
            return self.data
        beside = data.parent / "images"
        return str(beside if beside.is_dir() else data.parent)

    def load(self) -> Dataset:
        """Read the dataset again."""
        return load_dataset(
            self.data, images_root=self.images, split=self.split, split_file=self.split_file,
            allow_outside_images=self.allow_outside_images,
        )


def read_sources(directory: Path) -> list[Source]:
    """The sources recorded for the index in `directory` (none for an index made before they were kept)."""
    path = Path(directory) / SOURCES_JSON
    if not path.is_file():
        return []
    try:
        return [Source(**entry) for entry in json.loads(path.read_text())["sources"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadDataError(f"{path} is not a valid list of sources: {exc}") from exc


def record_source(directory: Path, source: Source) -> None:
    """Add `source` to the index's list (once), replacing the file atomically."""
    sources = read_sources(directory)
    if source in sources:
        return
    write_atomic(Path(directory) / SOURCES_JSON, json.dumps({"sources": [asdict(s) for s in sources + [source]]}, indent=2))
