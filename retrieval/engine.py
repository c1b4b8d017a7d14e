"""The query engine: text or image queries → top-k images or captions, with their metadata."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from indexer import Index, Item
from retrieval.encoders.base import Encoder
from retrieval.errors import BadQueryError, ItemNotFoundError
from retrieval.images import ImageInput

Target = Literal["image", "caption"]
TARGETS: tuple[Target, ...] = ("image", "caption")


@dataclass
class Hit:
    """One result: the item, its score, and for images the captions stored with them."""

    rank: int
    score: float
    item: Item
    captions: list[str]

    def to_dict(self) -> dict:
        """JSON-ready form of the hit."""
        item = self.item
        return {
            "rank": self.rank,
            "score": round(self.score, 6),
            "id": item.id,
            "kind": item.kind,
            "source_id": item.source_id,
            "path": item.path,
            "text": item.text,
            "image_id": item.image_item_id,
            "captions": self.captions,
        }


class QueryEngine:
    """Scores queries against an index in both directions; every method takes a batch.

    It reads the generation its index has loaded: whoever wants to follow writers calls
    `index.refresh()` (the server swaps in a newly loaded index instead, so concurrent
    searches never see one change under them). `encoder` defaults to the index's own.
    """

    def __init__(self, index: Index, encoder: Encoder | None = None) -> None:
        self.index = index
        self._encoder = encoder

    @property
    def encoder(self) -> Encoder:
        """The encoder that turns queries into vectors."""
        return self._encoder or self.index.encoder

    def _check(self, target: str, k: int) -> None:
        if target not in TARGETS:
            raise BadQueryError(f"search target must be one of {TARGETS}, got {target!r}")
        if k < 1:
            raise BadQueryError(f"k must be at least 1, got {k}")

    def search_vectors(self, vectors: np.ndarray, target: Target, k: int = 10) -> list[list[Hit]]:
        """Top-k `target` items for each query vector, best first."""
        self._check(target, k)
        scores, ids = self.index.search(target, vectors, k)
        found = sorted({int(i) for i in ids.ravel() if i >= 0})
        items = {item.id: item for item in self.index.items(found)}
        captions = self.index.captions_by_image([i for i, item in items.items() if item.kind == "image"])
        results = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for score, item_id in zip(row_scores, row_ids):
                item = items.get(int(item_id))
                if item is None:
                    continue
                texts = [c.text for c in captions.get(item.id, [])]
                hits.append(Hit(len(hits) + 1, float(score), item, texts))
            results.append(hits)
        return results

    def search_texts(self, texts: Sequence[str], target: Target = "image", k: int = 10) -> list[list[Hit]]:
        """Text queries → images (text → image) or captions (text → text)."""
        for i, text in enumerate(texts):
            if not text or not text.strip():
                raise BadQueryError(f"query {i + 1} is empty: give some words to search for")
        return self.search_vectors(self.encoder.encode_texts(list(texts)), target, k)

    def search_images(self, images: Sequence[ImageInput], target: Target = "caption", k: int = 10) -> list[list[Hit]]:
        """Image queries (paths or PIL images) → captions (image → text) or images (image → image)."""
        return self.search_vectors(self.encoder.encode_images(list(images)), target, k)

    def search_items(self, item_ids: Sequence[int], target: Target = "image", k: int = 10) -> list[list[Hit]]:
        """Queries by indexed items (their stored vectors): more like this image or this caption."""
        items = {item.id: item for item in self.index.items(list(item_ids))}
        missing = [i for i in item_ids if i not in items]
        if missing:
            raise ItemNotFoundError(f"no indexed item with id {missing[0]}", missing)
        vectors = np.stack([self.index.vectors(items[i].kind, [i])[0] for i in item_ids])
        return self.search_vectors(vectors, target, k)
