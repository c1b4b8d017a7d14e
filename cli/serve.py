"""`seesay serve`: the HTTP API and search page over an index."""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

from cli.common import SearchParamOpt, err, parse_search_params
from cli.index import IndexOpt


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    index_dir: Path = IndexOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback exposes the index to the network."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.001, help="Largest query image accepted, in MB."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Thumbnail cache folder (default: ~/.cache/seesay/thumbnails/<index>)."),
    no_disk_cache: bool = typer.Option(False, "--no-disk-cache", help="Keep thumbnails in memory only."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: critical, error, warning, info, debug."),
    search_param: list[str] = SearchParamOpt,
    allow_host: list[str] = typer.Option(
        [], "--allow-host",
        help="Host name the server answers to (repeatable). Default: loopback names for a loopback --host, any name otherwise.",
    ),
) -> None:
    """Serve the search API (/docs) and a search page (/) over an index, read-only."""
    import uvicorn

    from retrieval.server.app import create_app
    from retrieval.server.hosts import LOOPBACK_HOSTS

    loopback = _is_loopback(host)
    allowed = [*LOOPBACK_HOSTS, *allow_host] if loopback else (allow_host or None)
    app = create_app(
        index_dir,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        cache_dir=cache_dir,
        disk_cache=not no_disk_cache,
        search_params=parse_search_params(search_param),
        allowed_hosts=allowed,
    )
    if not loopback:
        err.print(f"[yellow]warning: binding {host}: anyone who can reach this address can query the index[/yellow]")
    shown = f"[{host}]" if ":" in host else host
    err.print(f"seesay: serving {index_dir} at http://{shown}:{port}/ (API docs at /docs); Ctrl+C stops")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
