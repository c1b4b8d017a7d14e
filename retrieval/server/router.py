"""`seesay serve --shards URL,...`: one search API over several shard servers, each a `seesay serve --index`.

A query goes to every shard at once; each answers its own top `offset + k`, and the lists
are merged by score (ties in shard order, then each shard's own order), which is exactly
the top `offset + k` of the union. Hits say which shard holds them (`shard`: its URL; ids
are that shard's). A shard that does not answer is never dropped silently: the answer
lists every shard with its status, and `complete` is false when one is missing.
"""
from __future__ import annotations

import asyncio
import heapq
import time
from typing import Any, Optional

import httpx
from fastapi import FastAPI, File, Form, Query, UploadFile
from pydantic import BaseModel, Field

from retrieval.server.hosts import LOOPBACK_HOSTS, HostCheck
from retrieval.server.routes import MAX_K, MAX_OFFSET, MAX_QUERY_CHARS
from retrieval.server.schemas import HitOut, TargetParam
from retrieval.server.uploads import DEFAULT_MAX_UPLOAD_BYTES, UploadLimit

SHARD_PAGE = MAX_K  # the most hits a shard returns per request


class ShardHit(HitOut):
    """A hit and the shard that holds it (its `id` is that shard's)."""

    shard: str = Field(description="URL of the shard server that holds the item")


class ShardStatus(BaseModel):
    url: str
    ok: bool
    error: Optional[str] = Field(None, description="Why the shard did not answer")


class RoutedSearchOut(BaseModel):
    """Merged results of one query over every shard."""

    query: str
    query_kind: str
    target: TargetParam
    k: int
    offset: int
    took_ms: float
    complete: bool = Field(description="False when a shard did not answer: the hits then come from the others only")
    shards: list[ShardStatus]
    hits: list[ShardHit]


class ShardDown(Exception):
    """A shard that could not be reached or answered with an error."""


async def _shard_top(client: httpx.AsyncClient, url: str, path: str, want: int, params: dict, upload: tuple | None) -> list[dict]:
    """A shard's top `want` hits, fetched a page of at most SHARD_PAGE at a time."""
    hits: list[dict] = []
    while len(hits) < want:
        page = {**params, "k": min(SHARD_PAGE, want - len(hits)), "offset": len(hits)}
        try:
            if upload is None:
                response = await client.get(f"{url}{path}", params=page)
            else:
                response = await client.post(f"{url}{path}", params=page, files={"file": upload})
        except httpx.HTTPError as exc:
            raise ShardDown(f"unreachable ({type(exc).__name__})") from exc
        if response.status_code != 200:
            raise ShardDown(f"HTTP {response.status_code}: {_detail(response)}")
        got = response.json()["hits"]
        hits += got
        if len(got) < page["k"]:
            break
    return hits


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", ""))[:200]
    except ValueError:
        return response.text[:200]


def merge(lists: list[list[dict]], offset: int, k: int) -> list[tuple[int, dict]]:
    """(shard number, hit) of ranks offset+1 .. offset+k over per-shard lists each sorted best first."""
    keyed = ([(-hit["score"], s, rank, hit) for rank, hit in enumerate(hits)] for s, hits in enumerate(lists))
    merged = heapq.merge(*keyed)
    return [(s, hit) for _, s, _, hit in list(merged)[offset : offset + k]]


class Router:
    """Fans queries out to the shard servers and merges their answers."""

    def __init__(self, shards: list[str], timeout_s: float = 30.0) -> None:
        self.shards = [url.rstrip("/") for url in shards]
        self.timeout_s = timeout_s

    async def search(self, path: str, query: str, query_kind: str, target: str, k: int, offset: int,
                     params: dict, upload: tuple | None = None) -> RoutedSearchOut:
        started = time.perf_counter()
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            answers = await asyncio.gather(
                *(_shard_top(client, url, path, offset + k, params, upload) for url in self.shards), return_exceptions=True
            )
        statuses, lists = [], []
        for url, answer in zip(self.shards, answers):
            if isinstance(answer, ShardDown):
                statuses.append(ShardStatus(url=url, ok=False, error=str(answer)))
                lists.append([])
            elif isinstance(answer, BaseException):
                raise answer
            else:
                statuses.append(ShardStatus(url=url, ok=True))
                lists.append(answer)
        hits = [ShardHit(**{**hit, "rank": offset + n + 1, "shard": self.shards[s]})
                for n, (s, hit) in enumerate(merge(lists, offset, k))]
        return RoutedSearchOut(
            query=query, query_kind=query_kind, target=target, k=k, offset=offset,
            took_ms=round((time.perf_counter() - started) * 1000, 2),
            complete=all(status.ok for status in statuses), shards=statuses, hits=hits,
        )

    async def health(self) -> list[ShardStatus]:
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            answers = await asyncio.gather(*(client.get(f"{url}/api/health") for url in self.shards), return_exceptions=True)
        return [
            ShardStatus(url=url, ok=isinstance(a, httpx.Response) and a.status_code == 200,
                        error=None if isinstance(a, httpx.Response) and a.status_code == 200
                        else (f"HTTP {a.status_code}" if isinstance(a, httpx.Response) else f"unreachable ({type(a).__name__})"))
            for url, a in zip(self.shards, answers)
        ]


def create_router_app(
    shards: list[str], *, timeout_s: float = 30.0, allowed_hosts=LOOPBACK_HOSTS, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
) -> FastAPI:
    """The search API over `shards` (base URLs of `seesay serve` servers)."""
    router = Router(shards, timeout_s)
    app = FastAPI(title="seesay router", description="Searches several seesay shard servers as one index.", version="0.1.0")
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)

    def filters(split: Optional[str], path_prefix: Optional[str]) -> dict[str, Any]:
        return {name: value for name, value in (("split", split), ("path_prefix", path_prefix)) if value is not None}

    @app.get("/api/health")
    async def health() -> dict:
        """The router is up; each shard's status."""
        statuses = await router.health()
        return {"status": "ok" if all(s.ok for s in statuses) else "degraded", "shards": [s.model_dump() for s in statuses]}

    @app.get("/api/search/text", response_model=RoutedSearchOut)
    async def search_text(
        q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS),
        k: int = Query(10, ge=1, le=MAX_K),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
        target: TargetParam = Query("image"),
        split: Optional[str] = Query(None, min_length=1, max_length=64),
        path_prefix: Optional[str] = Query(None, min_length=1, max_length=4096),
    ) -> RoutedSearchOut:
        """Text → images or captions, over every shard."""
        params = {"q": q, "target": target, **filters(split, path_prefix)}
        return await router.search("/api/search/text", q, "text", target, k, offset, params)

    @app.post("/api/search/image", response_model=RoutedSearchOut)
    async def search_image(
        file: UploadFile = File(...),
        k: int = Form(10, ge=1, le=MAX_K),
        offset: int = Form(0, ge=0, le=MAX_OFFSET),
        target: TargetParam = Form("caption"),
    ) -> RoutedSearchOut:
        """Image → captions or images, over every shard (each shard encodes the upload)."""
        data = await file.read()
        name = file.filename or "upload"
        upload = (name, data, file.content_type or "application/octet-stream")
        return await router.search("/api/search/image", name, "image", target, k, offset, {"target": target}, upload)

    return app
