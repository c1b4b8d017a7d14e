"""The endpoints: each takes the shared `Service` as a dependency and one snapshot of the index.

FastAPI runs these plain functions on its thread pool, so requests proceed in parallel;
nothing here takes a lock (see `service.py`).
"""
from __future__ import annotations

import hashlib
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response

from retrieval.engine import Filters, Hit
from retrieval.errors import BadImageError
from retrieval.server.schemas import (
    ERRORS,
    HealthOut,
    InfoOut,
    ItemOut,
    SearchOut,
    TargetParam,
    hit_out,
    info_out,
    item_out,
)
from retrieval.server.service import Service
from retrieval.server.thumbnails import DEFAULT_SIZE, SIZES
from retrieval.server.uploads import decode_upload, read_upload

STATIC_DIR = Path(__file__).parent / "static"
MAX_K = 100
# Deepest result a page may reach is MAX_OFFSET + MAX_K.
MAX_OFFSET = 10_000
MAX_QUERY_CHARS = 2000
# Item ids are SQL integers: larger numbers are not ids of anything.
MAX_ITEM_ID = 2**63 - 1


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
ItemId = Annotated[int, PathParam(ge=0, le=MAX_ITEM_ID, description="Item id in the index")]
K = Annotated[int, Query(ge=1, le=MAX_K, description="Number of results")]


class SearchOptions:
    """Paging and filters every search takes as query parameters."""

    def __init__(
        self,
        offset: int = Query(0, ge=0, le=MAX_OFFSET, description="Skip this many results first (the next page: offset=k)"),
        path_prefix: Optional[str] = Query(
            None, min_length=1, max_length=4096,
            description="Only images indexed from under this absolute folder (or that file), and their captions",
        ),
        split: Optional[str] = Query(None, min_length=1, max_length=64, description="Only items of this split"),
        added_after: Optional[datetime] = Query(None, description="Only items indexed after this time (ISO 8601; UTC unless it says)"),
    ) -> None:
        self.offset = offset
        self.filters = Filters(path_prefix, split, added_after)

    def engine_options(self) -> dict:
        return {"offset": self.offset, "filters": self.filters}


Options = Annotated[SearchOptions, Depends()]

router = APIRouter()


def _finish(
    query: str, query_kind: str, target: str, k: int, options: SearchOptions, started: float, hits: list[Hit]
) -> SearchOut:
    return SearchOut(
        query=query,
        query_kind=query_kind,
        target=target,
        k=k,
        offset=options.offset,
        took_ms=round((time.perf_counter() - started) * 1000, 2),
        hits=[hit_out(h) for h in hits],
    )


@router.get("/api/health", response_model=HealthOut, tags=["meta"])
def health() -> HealthOut:
    """Liveness: the server is up."""
    return HealthOut(status="ok")


@router.get("/api/info", response_model=InfoOut, tags=["meta"])
def info(service: ServiceDep) -> InfoOut:
    """The encoder, item counts and limits of the served index."""
    meta = service.snapshot().index.info()
    return info_out(meta, service.max_upload_bytes, MAX_K, list(SIZES))


@router.get("/api/search/text", response_model=SearchOut, responses=ERRORS, tags=["search"])
def search_text(
    service: ServiceDep,
    options: Options,
    q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS, description="Text to search for"),
    k: K = 10,
    target: TargetParam = Query("image", description="Search images (default) or captions"),
) -> SearchOut:
    """Text → images, or text → captions."""
    started = time.perf_counter()
    with service.query_slot():
        hits = service.snapshot().engine.search_texts([q], target, k, **options.engine_options())[0]
    return _finish(q, "text", target, k, options, started, hits)


def _one_of(name: str, in_url: object, in_form: object, default: object) -> object:
    """A parameter the client may send in the URL or the form, not differently in both."""
    if in_url is not None and in_form is not None and in_url != in_form:
        raise HTTPException(400, f"{name} is {in_url!r} in the URL but {in_form!r} in the form: send it once")
    return next((value for value in (in_url, in_form) if value is not None), default)


@router.post("/api/search/image", response_model=SearchOut, responses=ERRORS, tags=["search"])
def search_image(
    service: ServiceDep,
    options: Options,
    file: UploadFile = File(..., description="A PNG, JPEG, GIF, WebP, BMP or TIFF image"),
    k_url: Optional[int] = Query(None, alias="k", ge=1, le=MAX_K, description="Number of results (default 10)"),
    k_form: Optional[int] = Form(None, alias="k", ge=1, le=MAX_K, description="Number of results (default 10)"),
    target_url: Optional[TargetParam] = Query(None, alias="target", description="Search captions (default) or images"),
    target_form: Optional[TargetParam] = Form(None, alias="target", description="Search captions (default) or images"),
) -> SearchOut:
    """Image → captions, or image → images. `k` and `target` may come in the URL or as form fields."""
    started = time.perf_counter()
    k = _one_of("k", k_url, k_form, 10)
    target = _one_of("target", target_url, target_form, "caption")
    name = file.filename or "upload"
    data = read_upload(file.file, name, service.max_upload_bytes)
    with service.image_slot():
        vectors = service.encoder.encode_images([decode_upload(data, name, service.max_pixels)])
    engine = service.snapshot().engine
    # image → image leaves out an indexed copy of the uploaded file itself
    exclude = engine.indexed_copies([hashlib.sha256(data).hexdigest()]) if target == "image" else None
    hits = engine.search_vectors(vectors, target, k, exclude=exclude, **options.engine_options())[0]
    return _finish(name, "image", target, k, options, started, hits)


@router.get("/api/items/{item_id}", response_model=ItemOut, responses=ERRORS, tags=["items"])
def get_item(
    service: ServiceDep, item_id: ItemId, vector: bool = Query(False, description="Include the stored vector")
) -> ItemOut:
    """An item's metadata and captions; `?vector=true` adds its stored vector."""
    index = service.snapshot().index
    item = index.items([item_id])[0]
    captions = index.captions_of(item.id) if item.kind == "image" else []
    stored = index.vectors(item.kind, [item.id])[0] if vector else None
    return item_out(item, captions, stored)


@router.get("/api/items/{item_id}/similar", response_model=SearchOut, responses=ERRORS, tags=["search"])
def similar(
    service: ServiceDep,
    options: Options,
    item_id: ItemId,
    k: K = 10,
    target: TargetParam = Query("image", description="Search images (default) or captions"),
) -> SearchOut:
    """Search from an indexed item's stored vector: more images (or captions) like this one, never itself."""
    started = time.perf_counter()
    hits = service.snapshot().engine.search_items([item_id], target, k, **options.engine_options())[0]
    return _finish(f"item:{item_id}", "item", target, k, options, started, hits)


@router.get(
    "/thumbnails/{item_id}",
    responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
    response_class=Response,
    tags=["images"],
)
def thumbnail(
    service: ServiceDep,
    item_id: ItemId,
    request: Request,
    size: int = Query(DEFAULT_SIZE, description=f"Longest side in pixels, one of {SIZES}"),
) -> Response:
    """A JPEG thumbnail of an indexed image, by item id only."""
    if size not in SIZES:
        raise HTTPException(400, f"thumbnail size must be one of {list(SIZES)}, got {size}")
    item = service.snapshot().index.items([item_id])[0]
    if item.kind != "image" or not item.path:
        raise HTTPException(404, f"item {item_id} is a {item.kind}, not an image")
    try:
        thumb = service.thumbnails.get(item.id, item.path, size, render_guard=service.image_slot)
    except FileNotFoundError as exc:
        raise HTTPException(404, f"the image file of item {item_id} is missing") from exc
    except BadImageError as exc:  # the file's path stays on the server: say only what is wrong with it
        raise HTTPException(404, f"the image file of item {item_id} cannot be read: {exc.summary}") from exc
    headers = {"Cache-Control": "public, max-age=86400", "ETag": thumb.etag}
    if request.headers.get("if-none-match") == thumb.etag:
        return Response(status_code=304, headers=headers)
    return Response(thumb.data, media_type=thumb.media_type, headers=headers)


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
