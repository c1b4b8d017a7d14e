"""Thumbnails of indexed images: rendered from the file the index names, cached in memory and on disk.

Nothing here takes a path from a request: the server looks an item up by id and
passes the path the index stored for it. The pure rendering (`render_thumbnail`)
has no web dependencies, so the contact sheet uses it too.
"""
from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from indexer.files import write_atomic
from retrieval.cache import cache_dir
from retrieval.images import load_rgb

SIZES = (64, 128, 256, 512)
DEFAULT_SIZE = 256
MEDIA_TYPE = "image/jpeg"
JPEG_QUALITY = 85
# Bump when the rendering changes, so disk caches written by older versions are not served.
# 2: EXIF orientation applied, transparency composited onto white.
RENDER_VERSION = 2


def render_thumbnail(path: str | Path, size: int = DEFAULT_SIZE) -> bytes:
    """JPEG bytes of the image at `path`, scaled to fit a size×size box (never enlarged).

    Decoding goes through `load_rgb`, so Pillow's decompression-bomb guard applies and a
    missing, truncated or non-image file raises BadImageError.
    """
    image = load_rgb(path)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def default_cache_dir(index_dir: Path) -> Path:
    """Per-index folder under seesay's cache root (`retrieval.cache`)."""
    key = hashlib.sha256(str(Path(index_dir).resolve()).encode()).hexdigest()[:16]
    return cache_dir("thumbnails", key)


@dataclass(frozen=True)
class Thumbnail:
    """Rendered bytes and the validator for HTTP caching."""

    data: bytes
    etag: str
    media_type: str = MEDIA_TYPE


class ThumbnailCache:
    """An in-memory LRU (bounded in bytes) in front of an optional on-disk cache.

    Entries are keyed by item id, size and the source file's size and mtime, so a
    replaced file is rendered again rather than served stale.
    """

    def __init__(self, disk_dir: Path | None = None, memory_bytes: int = 32 * 1024 * 1024) -> None:
        self.disk_dir = None if disk_dir is None else Path(disk_dir)
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, Thumbnail] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self.renders = 0  # how many times a thumbnail was actually rendered (for tests and stats)

    @property
    def memory_used(self) -> int:
        """Bytes of thumbnails held in memory now (at most `memory_bytes`)."""
        return self._used

    @staticmethod
    def key(item_id: int, path: Path, size: int) -> str:
        stat = path.stat()  # FileNotFoundError when the indexed file is gone
        raw = f"{RENDER_VERSION}:{item_id}:{size}:{stat.st_size}:{stat.st_mtime_ns}:{path}"
        return f"{item_id}-{size}-{hashlib.sha256(raw.encode()).hexdigest()[:20]}"

    def get(
        self,
        item_id: int,
        path: str | Path,
        size: int,
        render_guard: Callable[[], AbstractContextManager] = nullcontext,
    ) -> Thumbnail:
        """The thumbnail of indexed image `item_id` stored at `path`, rendering it if needed.

        Rendering (not a cache hit) runs inside `render_guard()`, e.g. a slot that bounds
        how many images are decoded at once.
        """
        path = Path(path)
        key = self.key(item_id, path, size)
        with self._lock:
            hit = self._memory.get(key)
            if hit is not None:
                self._memory.move_to_end(key)
                return hit
        thumb = self._from_disk(key)
        if thumb is None:
            with render_guard():
                thumb = Thumbnail(render_thumbnail(path, size), etag=f'"{key}"')
            self.renders += 1
            self._to_disk(key, thumb.data)
        self._remember(key, thumb)
        return thumb

    def _remember(self, key: str, thumb: Thumbnail) -> None:
        if len(thumb.data) > self.memory_bytes:
            return
        with self._lock:
            if key in self._memory:
                return
            self._memory[key] = thumb
            self._used += len(thumb.data)
            while self._used > self.memory_bytes:
                _, old = self._memory.popitem(last=False)
                self._used -= len(old.data)

    def _disk_path(self, key: str) -> Path | None:
        return None if self.disk_dir is None else self.disk_dir / f"{key}.jpg"

    def _from_disk(self, key: str) -> Thumbnail | None:
        path = self._disk_path(key)
        if path is None:
            return None
        try:
            return Thumbnail(path.read_bytes(), etag=f'"{key}"')
        except OSError:
            return None

    def _to_disk(self, key: str, data: bytes) -> None:
        path = self._disk_path(key)
        if path is None:
            return
        try:
            write_atomic(path, data)
        except OSError:  # a read-only or full cache folder only costs a re-render next time
            pass
