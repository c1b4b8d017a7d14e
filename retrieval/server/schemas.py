"""What the API answers: response models, and how hits and items become them.

Responses name files by the dataset's image name (`source_id`), never by a path on the
server, and carry no exception text.
"""
from __future__ import annotations

from pathlib import PurePath
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, Field

from indexer import IndexInfo, Item
from retrieval.engine import Hit

TargetParam = Literal["image", "caption"]


class HitOut(BaseModel):
    """One search result."""

    rank: int = Field(description="1-based rank, best first")
    score: float = Field(description="Inner product of query and item vectors (higher is better)")
    id: int = Field(description="Item id in the index")
    kind: Literal["image", "caption"]
    source_id: str = Field(description="The image name in the dataset the item came from")
    text: Optional[str] = Field(None, description="Caption text (captions only)")
    image_id: Optional[int] = Field(None, description="Item id of the caption's image (captions only)")
    split: Optional[str] = Field(None, description="The split the item was indexed under")
    captions: list[str] = Field(default_factory=list, description="Captions stored with an image")
    thumbnail: Optional[str] = Field(None, description="URL of the thumbnail of the (caption's) image")


class SearchOut(BaseModel):
    """Results of one query."""

    query: str = Field(description="The text, the uploaded file name, or `item:ID`")
    query_kind: Literal["text", "image", "item"]
    target: TargetParam
    k: int
    offset: int = Field(0, description="Results skipped before the first hit (its rank is offset + 1)")
    took_ms: float
    hits: list[HitOut]


class CaptionOut(BaseModel):
    id: int
    text: str


class ItemOut(BaseModel):
    """An indexed image or caption with its captions (or its image)."""

    id: int
    kind: Literal["image", "caption"]
    source_id: str
    text: Optional[str] = None
    image_id: Optional[int] = None
    split: Optional[str] = None
    captions: list[CaptionOut] = Field(default_factory=list, description="An image's captions")
    thumbnail: Optional[str] = None
    vector: Optional[list[float]] = Field(None, description="The stored vector, with ?vector=true")


class EncoderOut(BaseModel):
    kind: str
    spec: str
    version: int


class InfoOut(BaseModel):
    """What the server is serving."""

    encoder: EncoderOut
    dim: int
    metric: Optional[str] = None
    factory: str
    generation: int
    n_images: int
    n_captions: int
    updated_at: Optional[str] = None
    max_upload_bytes: int
    max_k: int
    thumbnail_sizes: list[int]


class HealthOut(BaseModel):
    status: Literal["ok"]


class ErrorOut(BaseModel):
    detail: str


ERRORS = {
    400: {"model": ErrorOut},
    404: {"model": ErrorOut},
    413: {"model": ErrorOut},
    503: {"model": ErrorOut},
}


def thumbnail_url(item: Item) -> Optional[str]:
    """Where the page gets a picture of the item: its own for images, its image's for captions."""
    image_id = item.id if item.kind == "image" else item.image_item_id
    return None if image_id is None else f"/thumbnails/{image_id}"


def _item_fields(item: Item) -> dict:
    """The fields a hit and an item share, from the stored item."""
    return dict(
        id=item.id,
        kind=item.kind,
        source_id=item.source_id,
        text=item.text,
        image_id=item.image_item_id,
        split=item.split,
        thumbnail=thumbnail_url(item),
    )


def hit_out(hit: Hit) -> HitOut:
    return HitOut(rank=hit.rank, score=round(hit.score, 6), captions=hit.captions, **_item_fields(hit.item))


def item_out(item: Item, captions: list[Item], vector: np.ndarray | None) -> ItemOut:
    return ItemOut(
        captions=[CaptionOut(id=c.id, text=c.text or "") for c in captions],
        vector=None if vector is None else np.asarray(vector, dtype=np.float64).round(7).tolist(),
        **_item_fields(item),
    )


def public_spec(spec: str) -> str:
    """An encoder spec fit to show: a saved model folder is named by its last part, not its server path."""
    name, sep, digest = spec.partition("#")
    path = PurePath(name)
    if path.is_absolute() or len(path.parts) > 1:
        name = path.name
    return name + sep + digest


def info_out(meta: IndexInfo, max_upload_bytes: int, max_k: int, thumbnail_sizes: list[int]) -> InfoOut:
    encoder = meta.encoder
    return InfoOut(
        encoder=EncoderOut(kind=encoder.kind, spec=public_spec(encoder.spec), version=encoder.version),
        dim=meta.dim,
        metric=meta.metric,
        factory=meta.factory,
        generation=meta.generation,
        n_images=meta.n_images,
        n_captions=meta.n_captions,
        updated_at=meta.updated_at,
        max_upload_bytes=max_upload_bytes,
        max_k=max_k,
        thumbnail_sizes=thumbnail_sizes,
    )
