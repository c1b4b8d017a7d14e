"""Typed errors → HTTP answers. The status comes from the error's type, never from its text,
and no answer carries an exception's text: messages are written here or are seesay's own
words about the request (a bad query, an unreadable upload), and anything else is logged."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from retrieval.errors import BadImageError, BadQueryError, ImageTooLargeError, ItemNotFoundError, SeesayError
from retrieval.server.service import ServerBusyError

log = logging.getLogger("seesay.server")


def _answer(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


async def item_not_found(_request: Request, exc: ItemNotFoundError) -> JSONResponse:
    return _answer(404, f"no indexed item with id {exc.ids[0]}" if exc.ids else "no such item")


async def bad_query(_request: Request, exc: BadQueryError) -> JSONResponse:
    return _answer(400, str(exc))


async def bad_upload(_request: Request, exc: BadImageError) -> JSONResponse:
    """Only uploads raise this far (thumbnails answer for their files themselves): `path` is the upload's name."""
    status = 413 if isinstance(exc, ImageTooLargeError) else 400
    return _answer(status, f"image {str(exc.path)!r}: {exc.summary}")


async def busy(_request: Request, exc: ServerBusyError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})


async def index_unavailable(request: Request, exc: SeesayError) -> JSONResponse:
    log.error("cannot serve %s %s: %s", request.method, request.url.path, exc)
    return _answer(503, "the index cannot answer this request now; the server log says why")


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("error serving %s %s", request.method, request.url.path)
    return _answer(500, "internal error; the server log has the details")


def install(app: FastAPI) -> None:
    """Register the handlers; Starlette answers with the one registered for the nearest class of the error."""
    app.add_exception_handler(ItemNotFoundError, item_not_found)
    app.add_exception_handler(BadQueryError, bad_query)
    app.add_exception_handler(BadImageError, bad_upload)
    app.add_exception_handler(ServerBusyError, busy)
    app.add_exception_handler(SeesayError, index_unavailable)
    app.add_exception_handler(Exception, unexpected)
