"""Query images sent to the server: the body-size guard, then the one decode pipeline of `retrieval.images`."""
from __future__ import annotations

from typing import BinaryIO

from fastapi.responses import JSONResponse
from PIL import Image

from retrieval.errors import ImageTooLargeError
from retrieval.images import decode_bytes

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Formats an uploaded query image may be in; anything else is refused before decoding.
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
# Multipart framing around the file: headers, boundaries and the small k/target fields.
_MULTIPART_SLACK = 64 * 1024
UPLOAD_PATH = "/api/search/image"


def read_upload(file: BinaryIO, name: str, max_bytes: int) -> bytes:
    """The uploaded bytes, or ImageTooLargeError past `max_bytes`."""
    data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLargeError(name, f"upload too large: the limit is {max_bytes} bytes")
    return data


def decode_upload(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """An upright RGB image from uploaded bytes in one of UPLOAD_FORMATS, or BadImageError saying why."""
    return decode_bytes(data, name, formats=UPLOAD_FORMATS, max_pixels=max_pixels)


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
