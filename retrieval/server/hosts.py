"""The Host-header check that keeps a loopback server out of reach of DNS rebinding.

A page on evil.example can make a browser resolve its own name to 127.0.0.1 and then read
the responses of a server on the user's machine as same-origin. Such requests still say
`Host: evil.example`, so a server meant for loopback answers only the names of loopback.
"""
from __future__ import annotations

from typing import Collection

from fastapi.responses import JSONResponse

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
    """The name in a Host header, without the port: "[::1]:8000" → "::1", "Localhost:80" → "localhost"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


class HostCheck:
    """ASGI middleware: answer 400 to requests whose Host header names none of `allowed`."""

    def __init__(self, app, allowed: Collection[str]) -> None:
        self.app = app
        self.allowed = frozenset(host_name(name) for name in allowed)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers") or [])
            name = host_name(headers.get(b"host", b"").decode("latin-1"))
            if name not in self.allowed:
                response = JSONResponse(
                    {"detail": f"this server answers only to the host names {', '.join(sorted(self.allowed))}"},
                    status_code=400,
                )
                await response(scope, _no_receive, send)
                return
        await self.app(scope, receive, send)
