"""The HTTP API and search page: a FastAPI app over one read-only index and its QueryEngine.

Every call into the index (refresh, FAISS search, metadata look-ups) holds one lock,
so concurrent requests never race on `Index.refresh()` reloading the vector sets;
decoding uploads and rendering thumbnails happen outside it. The index is opened
read-only: a `seesay index` run appending in another process is picked up by the
engine's refresh at the next query, and readers only ever see committed generations.
"""
from __future__ import annotations

import io
import logging
import threading
import time
import warnings
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from indexer import Index, Item
from retrieval.engine import Hit, QueryEngine
from retrieval.errors import BadImageError, SeesayError
from retrieval.images import MAX_IMAGE_PIXELS
from retrieval.server.thumbnails import DEFAULT_SIZE, SIZES, ThumbnailCache, default_cache_dir

log = logging.getLogger("seesay.server")

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_K = 100
# Formats an uploaded query image may be in; anything else is refused before decoding.
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
# Multipart framing around the file: headers, boundaries and the small k/target fields.
_MULTIPART_SLACK = 64 * 1024
UPLOAD_PATH = "/api/search/image"

TargetParam = Literal["image", "caption"]


# ----- response models -----


class HitOut(BaseModel):
    """One search result."""

    rank: int = Field(description="1-based rank, best first")
    score: float = Field(description="Inner product of query and item vectors (higher is better)")
    id: int = Field(description="Item id in the index")
    kind: Literal["image", "caption"]
    source_id: str = Field(description="The image id from the dataset the item came from")
    path: Optional[str] = Field(None, description="Image file as indexed (images only)")
    text: Optional[str] = Field(None, description="Caption text (captions only)")
    image_id: Optional[int] = Field(None, description="Item id of the caption's image (captions only)")
    captions: list[str] = Field(default_factory=list, description="Captions stored with an image")
    thumbnail: Optional[str] = Field(None, description="URL of the thumbnail of the (caption's) image")


class SearchOut(BaseModel):
    """Results of one query."""

    query: str = Field(description="The text, the uploaded file name, or `item:ID`")
    query_kind: Literal["text", "image", "item"]
    target: TargetParam
    k: int
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
    path: Optional[str] = None
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


ERRORS = {400: {"model": ErrorOut}, 404: {"model": ErrorOut}, 413: {"model": ErrorOut}}


# ----- pieces -----


def thumbnail_url(item: Item) -> Optional[str]:
    """Where the page gets a picture of the item: its own for images, its image's for captions."""
    image_id = item.id if item.kind == "image" else item.image_item_id
    return None if image_id is None else f"/thumbnails/{image_id}"


def hit_out(hit: Hit) -> HitOut:
    return HitOut(**hit.to_dict(), thumbnail=thumbnail_url(hit.item))


def decode_upload(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Decode uploaded bytes into an RGB image, or raise HTTPException 400/413 saying why."""
    if not data:
        raise HTTPException(400, f"upload {name!r} is empty: send an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise HTTPException(
                        413, f"image {name!r} is {width}x{height} pixels; the limit is {max_pixels} pixels"
                    )
                img.load()
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise HTTPException(413, f"image {name!r} is too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise HTTPException(
            400, f"upload {name!r} is not an image in a supported format ({', '.join(UPLOAD_FORMATS)})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise HTTPException(400, f"image {name!r} is unreadable or truncated ({exc})") from exc


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


class UploadLimit:
    """ASGI middleware: refuse image-search request bodies over the limit with 413, before parsing.

    A declared Content-Length over the limit is refused at once; otherwise the body is
    read (and counted) up to the limit, then replayed to the app, so a chunked upload
    cannot make the multipart parser spool more than the limit either.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != UPLOAD_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes + _MULTIPART_SLACK
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                await self._too_large(scope, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, send) -> None:
        mb = self.max_bytes / (1024 * 1024)
        response = JSONResponse(
            {"detail": f"upload too large: the limit is {self.max_bytes} bytes ({mb:g} MB)"}, status_code=413
        )
        await response(scope, _no_receive, send)


class Service:
    """The index, its engine and the thumbnail cache, shared by every request."""

    def __init__(self, index: Index, thumbnails: ThumbnailCache) -> None:
        self.index = index
        self.engine = QueryEngine(index)
        self.thumbnails = thumbnails
        self._lock = threading.RLock()

    @contextmanager
    def locked(self) -> Iterator[QueryEngine]:
        """The engine, for one request's calls into the index (serialised across threads)."""
        with self._lock:
            try:
                yield self.engine
            except HTTPException:
                raise
            except SeesayError as exc:
                raise HTTPException(400, str(exc)) from exc

    def item(self, item_id: int) -> Item:
        """An item by id, or 404."""
        with self._lock:
            try:
                return self.index.items([item_id])[0]
            except SeesayError as exc:
                if str(exc).startswith("no item"):
                    raise HTTPException(404, f"no indexed item with id {item_id}") from exc
                raise HTTPException(503, str(exc)) from exc


def create_app(
    index_dir: str | Path,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    cache_dir: Path | None = None,
    disk_cache: bool = True,
    memory_cache_bytes: int = 32 * 1024 * 1024,
    search_params: dict[str, int] | None = None,
) -> FastAPI:
    """The seesay web app over the index in `index_dir`, opened read-only.

    `cache_dir` holds rendered thumbnails (default: a per-index folder under
    ~/.cache/seesay/thumbnails, never inside the index); `disk_cache=False` keeps
    them in memory only. `search_params` (e.g. {"nprobe": 64}) tune an approximate index.
    """
    index_dir = Path(index_dir)
    index = Index.open(index_dir, read_only=True)
    if search_params:
        try:
            index.set_search_params(**search_params)
        except SeesayError:
            index.close()
            raise
    index.encoder  # load the encoder now: a broken one is a start-up error, not a failed first query
    disk = (cache_dir or default_cache_dir(index_dir)) if disk_cache else None
    service = Service(index, ThumbnailCache(disk, memory_cache_bytes))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        index.close()

    app = FastAPI(
        lifespan=lifespan,
        title="seesay",
        description="Image-text retrieval: search indexed images and captions by text, by image, or from an indexed item.",
        version="0.1.0",
    )
    app.state.service = service
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)

    @app.exception_handler(SeesayError)
    async def seesay_error(_request: Request, exc: SeesayError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error serving %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    def finish(query: str, query_kind: str, target: str, k: int, started: float, hits: list[Hit]) -> SearchOut:
        return SearchOut(
            query=query,
            query_kind=query_kind,
            target=target,
            k=k,
            took_ms=round((time.perf_counter() - started) * 1000, 2),
            hits=[hit_out(h) for h in hits],
        )

    @app.get("/api/health", response_model=HealthOut, tags=["meta"])
    def health() -> HealthOut:
        """Liveness: the server is up."""
        return HealthOut(status="ok")

    @app.get("/api/info", response_model=InfoOut, tags=["meta"])
    def info() -> InfoOut:
        """The encoder, item counts and limits of the served index."""
        with service.locked():
            service.index.refresh()
            meta = service.index.info()
        return InfoOut(
            encoder=EncoderOut(**meta["encoder"]),
            dim=meta["dim"],
            metric=meta.get("metric"),
            factory=meta["factory"],
            generation=meta["generation"],
            n_images=meta["n_images"],
            n_captions=meta["n_captions"],
            updated_at=meta.get("updated_at"),
            max_upload_bytes=max_upload_bytes,
            max_k=MAX_K,
            thumbnail_sizes=list(SIZES),
        )

    @app.get("/api/search/text", response_model=SearchOut, responses=ERRORS, tags=["search"])
    def search_text(
        q: str = Query(..., min_length=1, max_length=2000, description="Text to search for"),
        k: int = Query(10, ge=1, le=MAX_K),
        target: TargetParam = Query("image", description="Search images (default) or captions"),
    ) -> SearchOut:
        """Text → images, or text → captions."""
        started = time.perf_counter()
        with service.locked() as engine:
            hits = engine.search_texts([q], target, k)[0]
        return finish(q, "text", target, k, started, hits)

    @app.post("/api/search/image", response_model=SearchOut, responses=ERRORS, tags=["search"])
    def search_image(
        file: UploadFile = File(..., description="A PNG, JPEG, GIF, WebP, BMP or TIFF image"),
        k: int = Form(10, ge=1, le=MAX_K),
        target: TargetParam = Form("caption", description="Search captions (default) or images"),
    ) -> SearchOut:
        """Image → captions, or image → images."""
        started = time.perf_counter()
        name = file.filename or "upload"
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload too large: the limit is {max_upload_bytes} bytes")
        image = decode_upload(data, name, max_pixels)
        with service.locked() as engine:
            try:
                vectors = engine.index.encoder.encode_images([image])
            except BadImageError as exc:
                raise HTTPException(400, f"image {name!r}: {exc.reason}") from exc
            hits = engine.search_vectors(vectors, target, k)[0]
        return finish(name, "image", target, k, started, hits)

    @app.get("/api/items/{item_id}", response_model=ItemOut, responses=ERRORS, tags=["items"])
    def get_item(item_id: int, vector: bool = Query(False, description="Include the stored vector")) -> ItemOut:
        """An item's metadata and captions; `?vector=true` adds its stored vector."""
        item = service.item(item_id)
        with service.locked():
            captions = [CaptionOut(id=c.id, text=c.text or "") for c in service.index.captions_of(item.id)] if item.kind == "image" else []
            stored = service.index.vectors(item.kind, [item.id])[0] if vector else None
        return ItemOut(
            id=item.id,
            kind=item.kind,
            source_id=item.source_id,
            path=item.path,
            text=item.text,
            image_id=item.image_item_id,
            split=item.split,
            captions=captions,
            thumbnail=thumbnail_url(item),
            vector=None if stored is None else np.asarray(stored, dtype=np.float64).round(7).tolist(),
        )

    @app.get("/api/items/{item_id}/similar", response_model=SearchOut, responses=ERRORS, tags=["search"])
    def similar(
        item_id: int,
        k: int = Query(10, ge=1, le=MAX_K),
        target: TargetParam = Query("image", description="Search images (default) or captions"),
    ) -> SearchOut:
        """Search from an indexed item's stored vector: more images (or captions) like this one."""
        started = time.perf_counter()
        service.item(item_id)  # 404 for unknown ids
        with service.locked() as engine:
            hits = engine.search_items([item_id], target, k)[0]
        return finish(f"item:{item_id}", "item", target, k, started, hits)

    @app.get(
        "/thumbnails/{item_id}",
        responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
        response_class=Response,
        tags=["images"],
    )
    def thumbnail(
        item_id: int,
        request: Request,
        size: int = Query(DEFAULT_SIZE, description=f"Longest side in pixels, one of {SIZES}"),
    ) -> Response:
        """A JPEG thumbnail of an indexed image, by item id only."""
        if size not in SIZES:
            raise HTTPException(400, f"thumbnail size must be one of {list(SIZES)}, got {size}")
        item = service.item(item_id)
        if item.kind != "image" or not item.path:
            raise HTTPException(404, f"item {item_id} is a {item.kind}, not an image")
        try:
            thumb = service.thumbnails.get(item.id, item.path, size)
        except FileNotFoundError as exc:
            raise HTTPException(404, f"the image file of item {item_id} is missing") from exc
        except BadImageError as exc:
            raise HTTPException(404, f"the image file of item {item_id} cannot be read: {exc.reason}") from exc
        headers = {"Cache-Control": "public, max-age=86400", "ETag": thumb.etag}
        if request.headers.get("if-none-match") == thumb.etag:
            return Response(status_code=304, headers=headers)
        return Response(thumb.data, media_type=thumb.media_type, headers=headers)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
