"""The seesay web app: wiring the service, middleware, error handlers and routes together.

The pieces: `schemas` (what the API answers), `uploads` (query images), `hosts` (the
Host-header check), `service` (the shared index snapshots, encoder and thumbnails),
`errors` (typed errors → status codes) and `routes` (the endpoints).
"""
from __future__ import annotations

import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Collection as Names

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from retrieval.collection import Collection
from retrieval.encoders.base import Encoder
from retrieval.images import MAX_IMAGE_PIXELS
from retrieval.server import errors
from retrieval.server.hosts import LOOPBACK_HOSTS, HostCheck
from retrieval.server.routes import STATIC_DIR, router
from retrieval.server.service import Service, Snapshots
from retrieval.server.thumbnails import ThumbnailCache, default_cache_dir
from retrieval.server.uploads import DEFAULT_MAX_UPLOAD_BYTES, UploadLimit

# Images decoded or encoded at once (uploads and thumbnail renders), and text queries
# encoded and searched at once; more wait their turn. Two queries per core kept p99 at 8
# concurrent clients within 3x p50 where one per core lost a third of the throughput
# (benchmarks/load.py, RESULTS.md).
IMAGE_SLOTS = 2
QUERY_SLOTS = 2 * (os.cpu_count() or 2)


def create_app(
    index_dir: str | Path,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    cache_dir: Path | None = None,
    disk_cache: bool = True,
    memory_cache_bytes: int = 32 * 1024 * 1024,
    search_params: dict[str, int] | None = None,
    allowed_hosts: Names[str] | None = LOOPBACK_HOSTS,
    image_slots: int = IMAGE_SLOTS,
    query_slots: int = QUERY_SLOTS,
) -> FastAPI:
    """The seesay web app over the index in `index_dir`, opened read-only.

    `cache_dir` holds rendered thumbnails (default: a per-index folder under
    ~/.cache/seesay/thumbnails, never inside the index); `disk_cache=False` keeps
    them in memory only. `search_params` (e.g. {"nprobe": 64}) tune an approximate index.
    `allowed_hosts` are the names the server answers to (loopback by default, against
    DNS rebinding); None answers any Host header.
    """
    index_dir = Path(index_dir)
    snapshots = Snapshots(index_dir, _load_encoder(index_dir), search_params)
    disk = (cache_dir or default_cache_dir(index_dir)) if disk_cache else None
    service = Service(
        snapshots,
        ThumbnailCache(disk, memory_cache_bytes),
        max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels,
        image_slots=image_slots,
        query_slots=query_slots,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        service.close()

    app = FastAPI(
        lifespan=lifespan,
        title="seesay",
        description="Image-text retrieval: search indexed images and captions by text, by image, or from an indexed item.",
        version="0.1.0",
    )
    app.state.service = service
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)  # added last: it runs first
    errors.install(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _load_encoder(index_dir: Path) -> Encoder:
    """The index's encoder, loaded and warmed up now: a broken one is a start-up error, not a failed query.

    The warm-up also lets lazily built parts (tokenizer settings, kernels) settle before
    requests use the encoder from many threads at once.
    """
    with Collection.open(index_dir, read_only=True) as collection:
        encoder = collection.encoder  # checks the encoder's dimension against the index's
    encoder.encode_texts(["warm-up"])
    return encoder
