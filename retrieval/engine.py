"""The query engine: text or image queries → top-k images or captions, with their metadata."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Collection, Literal, Optional, Sequence

import numpy as np

from indexer import Index, Item
from retrieval.ingest import file_hash, normalise_caption, under
from retrieval.encoders.base import Encoder, TextQueries
from retrieval.errors import BadQueryError, ItemNotFoundError
from retrieval.images import ImageInput

Target = Literal["image", "caption"]
# The deepest result a query may ask for (k + offset): answers are assembled in memory.
MAX_RESULTS = 10_000
TARGETS: tuple[Target, ...] = ("image", "caption")
# How many more candidates each round of a filtered or deduplicated search asks the index for.
_GROWTH = 4


@dataclass(frozen=True)
class Filters:
    """Conditions on stored metadata that every hit must meet.

    `path_prefix` is an absolute file or folder: images stored at it or under it pass (a
    caption goes with its image's file).
    """

    path_prefix: Optional[str] = None
    split: Optional[str] = None
    added_after: Optional[datetime] = None  # naive times are taken as UTC

    def __bool__(self) -> bool:
        return any(value is not None for value in (self.path_prefix, self.split, self.added_after))

    def admit(self, item: Item, image_path: Optional[str]) -> bool:
        """Whether a hit on `item`, showing the image file `image_path`, passes."""
        if self.split is not None and item.split != self.split:
            return False
        if self.added_after is not None:
            after = self.added_after if self.added_after.tzinfo else self.added_after.replace(tzinfo=timezone.utc)
            if item.added_at is None or item.added_at <= after:
                return False
        return self.path_prefix is None or under(image_path or "", self.path_prefix)


@dataclass
class Hit:
    """One result: the item, its score, the image file it shows, and for images the captions stored with them."""

    rank: int
    score: float
    item: Item
    captions: list[str]
    image_path: Optional[str] = None

    def to_dict(self) -> dict:
        """JSON-ready form of the hit; a caption carries its image's id and path."""
        item = self.item
        return {
            "rank": self.rank,
            "score": round(self.score, 6),
            "id": item.id,
            "kind": item.kind,
            "source_id": item.source_id,
            "path": self.image_path,
            "text": item.text,
            "image_id": item.image_item_id,  # the JSON name since the first release: the item id of a caption's image
            "split": item.split,
            "captions": self.captions,
        }


class QueryEngine:
    """Scores queries against an index in both directions; every method takes a batch.

    It reads the generation its index has loaded: whoever wants to follow writers calls
    `index.refresh()` (the server swaps in a newly loaded index instead, so concurrent
    searches never see one change under them). `encoder` turns queries into vectors: the
    index's own (`Collection.encoder`), or a function that loads it, called on the first
    query that needs it (searches from stored vectors never load a model). `text_queries`,
    if given, loads what text queries need where that is less than the whole encoder
    (`Collection.text_queries`: a text query then loads no image side and, for the towers
    kind, no torch).

    Every search takes `offset` (skip that many hits: page 2 of 10 is offset=10, k=10) and
    `filters`. Caption results hold each caption text once (its best-scoring copy).
    """

    def __init__(
        self,
        index: Index,
        encoder: Encoder | Callable[[], Encoder],
        text_queries: Optional[Callable[[], TextQueries]] = None,
    ) -> None:
        self.index = index
        self._encoder = encoder
        self._text_queries = text_queries

    @property
    def encoder(self) -> Encoder:
        """The encoder that turns queries into vectors (loaded now if it was given as a loader)."""
        if not isinstance(self._encoder, Encoder):
            self._encoder = self._encoder()
        return self._encoder

    @property
    def text_queries(self) -> TextQueries:
        """What encodes text queries: the encoder when loaded or when no lighter path was given."""
        if isinstance(self._encoder, Encoder) or self._text_queries is None:
            return self.encoder
        return self._text_queries()

    def _check(self, target: str, k: int, offset: int) -> None:
        if target not in TARGETS:
            raise BadQueryError(f"search target must be one of {TARGETS}, got {target!r}")
        if k < 1:
            raise BadQueryError(f"k must be at least 1, got {k}")
        if offset < 0:
            raise BadQueryError(f"offset must be 0 or more, got {offset}")
        if k + offset > MAX_RESULTS:
            raise BadQueryError(f"k + offset is at most {MAX_RESULTS} (results are found in memory), got {k + offset}")

    def search_vectors(
        self,
        vectors: np.ndarray,
        target: Target,
        k: int = 10,
        *,
        offset: int = 0,
        filters: Filters = Filters(),
        exclude: Optional[Sequence[Collection[int]]] = None,
    ) -> list[list[Hit]]:
        """Hits `offset`+1 … `offset`+k among `target` items for each query vector, best first.

        `exclude[i]` names item ids that query i must not return (e.g. the query item itself).
        When filters, exclusions or duplicate captions drop candidates, the index is asked
        for more until each query has enough or the index has no more.
        """
        self._check(target, k, offset)
        wanted = offset + k
        plain = target == "image" and not filters and not exclude
        fetch = wanted if plain else 2 * wanted + 8
        while True:
            scores, ids = self.index.search(target, vectors, fetch)
            results = self._hits(scores, ids, filters, exclude)
            short = [len(hits) < wanted and row[-1] >= 0 for hits, row in zip(results, ids)]
            if not any(short):
                break
            fetch *= _GROWTH
        pages = []
        for hits in results:
            page = hits[offset:wanted]
            for rank, hit in enumerate(page, offset + 1):
                hit.rank = rank
            pages.append(page)
        return pages

    def _hits(
        self,
        scores: np.ndarray,
        ids: np.ndarray,
        filters: Filters,
        exclude: Optional[Sequence[Collection[int]]],
    ) -> list[list[Hit]]:
        """Every admissible hit of each row, in score order, with captions and image paths filled in."""
        found = sorted({int(i) for i in ids.ravel() if i >= 0})
        listed, captions = self.index.items_and_captions(found)  # captions: of the hits that are images
        items = {item.id: item for item in listed}
        owners = sorted({item.image_item_id for item in listed if item.kind == "caption"} - set(items) - {None})
        images = {item.id: item for item in self.index.items(owners)} if owners else {}
        images.update((i, item) for i, item in items.items() if item.kind == "image")
        results = []
        for row, (row_scores, row_ids) in enumerate(zip(scores, ids)):
            dropped = exclude[row] if exclude else ()
            seen: set[str] = set()
            hits = []
            for score, item_id in zip(row_scores, row_ids):
                item = items.get(int(item_id))
                if item is None or item.id in dropped:
                    continue
                image = images.get(item.id if item.kind == "image" else item.image_item_id)
                path = image.path if image is not None else None
                if not filters.admit(item, path):
                    continue
                if item.kind == "caption":
                    key = normalise_caption(item.text or "")
                    if key in seen:
                        continue
                    seen.add(key)
                texts = [c.text for c in captions.get(item.id, [])]
                hits.append(Hit(len(hits) + 1, float(score), item, texts, path))
            results.append(hits)
        return results

    def search_texts(
        self, texts: Sequence[str], target: Target = "image", k: int = 10, **options
    ) -> list[list[Hit]]:
        """Text queries → images (text → image) or captions (text → text); `options` as for search_vectors."""
        for i, text in enumerate(texts):
            if not text or not text.strip():
                raise BadQueryError(f"query {i + 1} is empty: give some words to search for")
        vectors = self.text_queries.encode_text_queries(list(texts), cross_modal=target != "caption")
        return self.search_vectors(vectors, target, k, **options)

    def search_images(
        self, images: Sequence[ImageInput], target: Target = "caption", k: int = 10, **options
    ) -> list[list[Hit]]:
        """Image queries (paths or PIL images) → captions (image → text) or images (image → image).

        Image → image never answers a query file with itself: an indexed image with the same
        content is left out.
        """
        vectors = self.encoder.encode_images(list(images))
        if target == "image" and "exclude" not in options:
            options["exclude"] = self.indexed_copies([file_hash(i) if isinstance(i, (str, Path)) else None for i in images])
        return self.search_vectors(self._queries(vectors, "image", target), target, k, **options)

    def indexed_copies(self, hashes: Sequence[Optional[str]]) -> list[set[int]]:
        """For each content hash (None: unknown), the indexed image with that content, if any."""
        found = self.index.ids_by_hash("image", [h for h in hashes if h is not None])
        return [{found[h]} if h in found else set() for h in hashes]

    def search_items(
        self, item_ids: Sequence[int], target: Target = "image", k: int = 10, **options
    ) -> list[list[Hit]]:
        """Queries by indexed items (their stored vectors): more like this image or this caption.

        An item never comes back as a hit of its own query.
        """
        items = {item.id: item for item in self.index.items(list(item_ids))}
        missing = [i for i in item_ids if i not in items]
        if missing:
            raise ItemNotFoundError(f"no indexed item with id {missing[0]}", missing)
        kinds = {items[i].kind for i in item_ids}
        if len(kinds) > 1:
            return [self.search_items([i], target, k, **options)[0] for i in item_ids]
        vectors = np.stack([self.index.vectors(items[i].kind, [i])[0] for i in item_ids])
        vectors = self._stored_queries(vectors, kinds.pop(), target)
        return self.search_vectors(vectors, target, k, exclude=[{i} for i in item_ids], **options)

    def _stored_queries(self, vectors: np.ndarray, source: str, target: Target) -> np.ndarray:
        """`_queries` for stored rows, without loading the model: its saved manifest says whether rows carry a bias."""
        if isinstance(self._encoder, Encoder):
            return self._queries(vectors, source, target)
        from retrieval.encoders import querybank
        from retrieval.encoders.base import read_manifest
        from retrieval.errors import EncoderError

        try:
            hubness = read_manifest(self.index.artefact_dir).get("config", {}).get("hubness_tau")
        except EncoderError:  # no saved encoder: plain vectors, as every index built before hubness correction
            hubness = None
        return querybank.as_queries(vectors, source != target) if hubness else vectors

    def _queries(self, vectors: np.ndarray, source: str, target: Target) -> np.ndarray:
        """Encoded rows of `source` items → query rows for `target` (the encoder marks cross-modal queries)."""
        return self.encoder.as_queries(vectors, cross_modal=source != target)
