"""Bring an index in line with its datasets as they are now: `seesay update`, prune and delete by path.

Images are matched by content hash, so a file that moved keeps its item (id, vector,
captions) and only its path changes; a file whose content changed is a new image.
Under the folders the datasets cover, the index ends up holding exactly what they list
now; items elsewhere are left alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from retrieval.collection import Collection
from retrieval.datasets import Record
from retrieval.ingest import AddReport, caption_hash, file_hash, stored_path, under
from retrieval.errors import BadImageError


@dataclass
class SyncReport:
    """What one update did."""

    moved: int = 0
    removed: int = 0  # items deleted: images that are gone (with their captions) and captions no longer listed
    added: AddReport = field(default_factory=AddReport)

    def summary(self) -> str:
        """One line for people."""
        return f"{self.added.summary()}; {self.moved} images re-pointed to where they moved; {self.removed} items removed"

    def to_dict(self) -> dict:
        return {"moved": self.moved, "removed": self.removed, **vars(self.added)}


def sync(collection: Collection, records: Sequence[Record], folders: Sequence[str], progress: bool = False) -> SyncReport:
    """Make the index hold exactly `records` among the images under `folders`: add, re-point, remove."""
    index = collection.index
    index.check_writable("update")
    report = SyncReport()
    hashes: dict[int, str] = {}
    for position, record in enumerate(records):
        try:
            hashes[position] = file_hash(record.image_path)
        except BadImageError:
            continue  # listed but unreadable: not kept; `add` below names it
    indexed = index.ids_by_hash("image", list(hashes.values()))
    kept = {indexed[h] for h in hashes.values() if h in indexed}
    current = {item.id: item.path for item in index.items(sorted(kept))}
    moves: dict[int, str] = {}
    for position, image_hash in hashes.items():
        item_id = indexed.get(image_hash)
        path = stored_path(records[position].image_path)
        if item_id is not None and item_id not in moves and current[item_id] != path and not _exists(current[item_id]):
            moves[item_id] = path
    gone = {item.id for folder in folders for item in index.images_under(folder.rstrip(os.sep) + os.sep)} - kept
    wanted = {caption_hash(hashes[p], text) for p, record in enumerate(records) if p in hashes for text in record.captions}
    listed = set(index.ids_by_hash("caption", list(wanted)).values())
    stale = {c.id for captions in index.captions_by_image(sorted(kept)).values() for c in captions} - listed
    report.removed = index.delete(sorted(gone | stale))
    index.set_paths(moves)
    report.moved = len(moves)
    report.added = collection.add(list(records), progress=progress)
    return report


def _exists(path: str | None) -> bool:
    return path is not None and Path(path).is_file()


def missing_images(collection: Collection, folder: str | None = None) -> list[int]:
    """Ids of indexed images (under `folder`, if given) whose file is no longer there."""
    prefix = None if folder is None else folder.rstrip(os.sep) + os.sep
    return [item.id for item in collection.index.images_under(prefix) if not _exists(item.path)]


def images_at(collection: Collection, paths: Sequence[Path]) -> list[int]:
    """Ids of indexed images stored at these files, or under these folders."""
    found: list[int] = []
    for path in paths:
        target = stored_path(path)
        found += [item.id for item in collection.index.images_under(target) if under(item.path or "", target)]
    return sorted(set(found))
