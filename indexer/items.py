"""What the storage engine takes in and gives back: items, rows to add, and what an add did."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Literal

Kind = Literal["image", "caption"]


@dataclass(frozen=True)
class Item:
    """An indexed image or caption as callers see it."""

    id: int
    kind: str
    source_id: str
    path: str | None
    text: str | None
    image_item_id: int | None
    split: str | None
    added_at: datetime | None = field(default=None, compare=False)  # when it was indexed, UTC


@dataclass(frozen=True)
class NewItem:
    """One row to add with its vector. Content `hash` makes adding idempotent.

    A caption names its image by `image_hash`: an image already indexed, or one
    among the same `Index.add_vectors` call.
    """

    kind: Kind
    source_id: str
    hash: str
    path: str | None = None
    text: str | None = None
    split: str | None = None
    image_hash: str | None = None


@dataclass
class Added:
    """What one `Index.add_vectors` call stored: an id per row, or why the row was skipped."""

    ids: list[int | None]
    existing: list[int] = field(default_factory=list)  # rows whose hash was already indexed
    orphaned: list[int] = field(default_factory=list)  # captions whose image is not indexed

    def count(self, rows: "list[NewItem]", kind: Kind) -> int:
        """How many rows of `kind` were stored."""
        return sum(1 for row, item_id in zip(rows, self.ids) if row.kind == kind and item_id is not None)


@dataclass(frozen=True)
class BuiltBy:
    """The encoder that made an index's vectors, as the manifest records it (opaque to the index)."""

    kind: str
    identity: str  # "spec#weights-digest"
    version: int
    dim: int


@dataclass(frozen=True)
class EncoderInfo:
    """The encoder an index records (`IndexInfo.encoder`): kind, "spec#weights-digest" and version."""

    kind: str
    spec: str
    version: int


@dataclass(frozen=True)
class IndexInfo:
    """What `Index.info` reports: manifest, counts, segments, current files and database.

    `to_dict` is the JSON form `seesay info --json` prints, key for key in field order.
    """

    directory: str
    format_version: int
    db_url: str
    encoder: EncoderInfo
    dim: int
    metric: str
    factory: str
    generation: int
    n_images: int
    n_captions: int
    segments: dict[str, int]  # committed segments per kind
    tombstones: int  # deleted rows whose vectors a merge has not dropped yet
    created_at: str  # ISO 8601
    updated_at: str
    files: dict[str, int]  # current segment file name -> bytes
    search_params: dict[str, int]
    read_only: bool

    def count(self, kind: Kind) -> int:
        """Items of `kind` ("image" or "caption") in the index."""
        return self.n_images if kind == "image" else self.n_captions

    def to_dict(self) -> dict:
        """JSON-ready form, nested encoder included."""
        return asdict(self)
