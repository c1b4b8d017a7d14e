"""`seesay serve`: the HTTP API and search page over an index."""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

from cli.common import SearchParamOpt, err, parse_search_params


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    index_dir: Optional[Path] = typer.Option(None, "--index", help="Index directory to serve."),
    shards: Optional[str] = typer.Option(
        None, "--shards",
        help="Instead of --index: route queries to these shard servers (comma-separated base URLs of `seesay serve`) and merge their results.",
    ),
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
    """Serve the search API (/docs) and a search page (/) over an index, read-only; or route over shard servers."""
    import uvicorn

    from retrieval.server.hosts import LOOPBACK_HOSTS

    if (index_dir is None) == (shards is None):
        raise typer.BadParameter("give either --index DIR or --shards URL,URL,...", param_hint="--index / --shards")
    loopback = _is_loopback(host)
    allowed = [*LOOPBACK_HOSTS, *allow_host] if loopback else (allow_host or None)
    if shards is not None:
        _serve_router(shards, host, port, log_level, allowed, max_upload_mb, loopback)
        return
    from retrieval.server.app import create_app

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


def _serve_router(shards: str, host: str, port: int, log_level: str, allowed, max_upload_mb: float, loopback: bool) -> None:
    import uvicorn

    from retrieval.server.router import create_router_app

    urls = [url.strip() for url in shards.split(",") if url.strip()]
    bad = [url for url in urls if not url.startswith(("http://", "https://"))]
    if not urls or bad:
        raise typer.BadParameter(f"expected http(s) base URLs, got {', '.join(bad) or 'none'}", param_hint="--shards")
    app = create_router_app(urls, allowed_hosts=allowed, max_upload_bytes=int(max_upload_mb * 1024 * 1024))
    if not loopback:
        err.print(f"[yellow]warning: binding {host}: anyone who can reach this address can query the shards[/yellow]")
    shown = f"[{host}]" if ":" in host else host
    err.print(f"seesay: routing over {len(urls)} shards at http://{shown}:{port}/api/search/text; Ctrl+C stops")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
