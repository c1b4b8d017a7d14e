"""What every request shares: the served index as an immutable snapshot, the encoder, thumbnails.

No lock is held while a request decodes, encodes or searches. Each request takes the
current `Snapshot` (a read-only index loaded at one generation, never refreshed, so any
number of threads may search it) and keeps it to the end. When a writer in another
process commits a new generation, the first request to notice loads it and swaps it in
with one assignment; requests already running finish on the old one, and requests
arriving meanwhile are not held up. Image work (decoding, encoding, thumbnails) runs in
a bounded number of slots, so a burst of large uploads cannot take all memory.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from indexer import Index
from retrieval.encoders.base import Encoder
from retrieval.engine import QueryEngine
from retrieval.errors import SeesayError
from retrieval.server.thumbnails import ThumbnailCache

log = logging.getLogger("seesay.server")


class ServerBusyError(SeesayError):
    """Every slot for image work stayed taken for longer than a request may wait."""


@dataclass(frozen=True)
class Snapshot:
    """One committed generation of the index, loaded, with an engine over it."""

    index: Index
    engine: QueryEngine

    @property
    def generation(self) -> int:
        return self.index.generation


class Snapshots:
    """The newest committed generation of the index in `directory`, followed as writers commit."""

    def __init__(self, directory: Path, encoder: Encoder, search_params: dict[str, int] | None = None) -> None:
        self.directory = directory
        self.encoder = encoder
        self.search_params = dict(search_params or {})
        self._watch = Index.open(directory, read_only=True)  # only reads the committed generation
        self._poll = threading.Lock()  # guards the watcher: one short SQL read
        self._swap = threading.Lock()  # one loader at a time; readers never wait for it
        self._retired: list[Index] = []
        try:
            self._current = self._load()
        except BaseException:
            self._watch.close()
            raise

    def _load(self) -> Snapshot:
        index = Index.open(self.directory, read_only=True)
        try:
            if self.search_params:
                index.set_search_params(**self.search_params)
            index.load()
        except BaseException:
            index.close()
            raise
        return Snapshot(index, QueryEngine(index, self.encoder))

    def current(self) -> Snapshot:
        """The snapshot of the newest committed generation, loading it first if this request is the one to."""
        with self._poll:
            self._watch.refresh()
            committed = self._watch.generation
        if committed != self._current.generation and self._swap.acquire(blocking=False):
            try:
                if committed != self._current.generation:
                    self._swap_in()
            finally:
                self._swap.release()
        return self._current

    def _swap_in(self) -> None:
        try:
            fresh = self._load()
        except SeesayError as exc:  # e.g. a writer removed files while we read: keep serving what we have
            log.warning("could not load the new generation of %s (serving the previous one): %s", self.directory, exc)
            return
        old, self._current = self._current, fresh
        # Requests may still be searching the old snapshot: its database connections close
        # with the next swap, by when they have long finished.
        for index in self._retired:
            index.close()
        self._retired = [old.index]

    def close(self) -> None:
        for index in (self._watch, self._current.index, *self._retired):
            index.close()


class Slots:
    """At most `n` requests doing one kind of heavy work at once; the others wait their turn, in arrival order."""

    def __init__(self, n: int, what: str, wait_s: float) -> None:
        self._free = threading.BoundedSemaphore(n)
        self.what = what
        self.wait_s = wait_s

    @contextmanager
    def __call__(self) -> Iterator[None]:
        """Hold a slot for the block, or ServerBusyError after `wait_s`."""
        if not self._free.acquire(timeout=self.wait_s):
            raise ServerBusyError(f"the server is busy with other {self.what}; try again shortly")
        try:
            yield
        finally:
            self._free.release()


class Service:
    """The snapshots, encoder, thumbnail cache, limits and work slots shared by every request.

    Image work (decoding, encoding, thumbnails) and text queries each run in a few slots:
    more at once would only share the cores among more threads, so every request would
    take longer and the slowest far longer. Requests beyond that queue.
    """

    def __init__(
        self,
        snapshots: Snapshots,
        thumbnails: ThumbnailCache,
        *,
        max_upload_bytes: int,
        max_pixels: int,
        image_slots: int = 2,
        query_slots: int = 2,
        slot_wait_s: float = 30.0,
    ) -> None:
        self.snapshots = snapshots
        self.thumbnails = thumbnails
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.image_slot = Slots(image_slots, "images", slot_wait_s)
        self.query_slot = Slots(query_slots, "queries", slot_wait_s)

    @property
    def encoder(self) -> Encoder:
        return self.snapshots.encoder

    def snapshot(self) -> Snapshot:
        return self.snapshots.current()

    def close(self) -> None:
        self.snapshots.close()
