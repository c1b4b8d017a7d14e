"""`seesay search`: query an index with text, an image, an indexed item, or a file of queries."""
from __future__ import annotations

import json
import os
from datetime import datetime
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import JsonOpt, SearchParamOpt, err, out, parse_search_params, print_json
from cli.index import IndexOpt
from indexer import Index
from retrieval.collection import Collection
from retrieval.engine import MAX_RESULTS, TARGETS, Filters, Hit, QueryEngine
from retrieval.errors import SeesayError

# Text queries encoded and searched together when reading --queries.
QUERY_BATCH = 256


def hits_table(title: str, hits: list[Hit]) -> Table:
    """Results as a table: rank, score, id, and the image path and caption text."""
    table = Table(title=title)
    for column in ("#", "score", "id", "item"):
        table.add_column(column, justify="right" if column != "item" else "left")
    for hit in hits:
        if hit.item.kind == "image":
            label = hit.image_path or ""
            if hit.captions:
                label = f"{label}\n[dim]{hit.captions[0]}[/dim]"
        else:
            label = f"{hit.item.text}\n[dim]{hit.image_path} (image {hit.item.image_item_id})[/dim]"
        table.add_row(str(hit.rank), f"{hit.score:.4f}", str(hit.item.id), label)
    return table


def search(
    query: Optional[str] = typer.Argument(None, help="Text to search for."),
    index_dir: Path = IndexOpt,
    image: Optional[Path] = typer.Option(None, "--image", help="Search with this image instead of text."),
    item_id: Optional[int] = typer.Option(None, "--id", help="Search from an indexed item (its stored vector): more like it."),
    queries: Optional[Path] = typer.Option(
        None, "--queries", help="Run every line of this file (- for stdin) as a text query, in one process; "
        "with --json, one JSON object per line."),
    k: int = typer.Option(10, "-k", "--k", min=1, max=MAX_RESULTS, help=f"Number of results (at most {MAX_RESULTS})."),
    offset: int = typer.Option(
        0, "--offset", min=0, max=MAX_RESULTS - 1, help="Skip this many results first (the next page: --offset 10 -k 10)."
    ),
    target: Optional[str] = typer.Option(None, "--target", help="image | caption (default: images for text and --id, captions for an image)."),
    path_prefix: Optional[str] = typer.Option(None, "--path-prefix", help="Only images whose file (or captions whose image's file) is under this path."),
    split: Optional[str] = typer.Option(None, "--split", help="Only items of this split."),
    added_after: Optional[datetime] = typer.Option(
        None, "--added-after", formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f"],
        help="Only items indexed after this time (UTC), e.g. 2026-12-01 or 2026-12-01T18:00:00."),
    as_json: bool = JsonOpt,
    html_out: Optional[Path] = typer.Option(
        None, "--html",
        help="Also write the results as a self-contained HTML contact sheet (thumbnails embedded) to this file.",
    ),
    search_param: list[str] = SearchParamOpt,
) -> None:
    """Text → images (or captions), image → captions (or images), item → similar items; one query or a file of them."""
    given = [name for name, value in (("a text query", query), ("--image", image), ("--id", item_id), ("--queries", queries)) if value is not None]
    if len(given) != 1:
        raise typer.BadParameter(f"give either a text query, --image FILE, --id ITEM or --queries FILE (got {' and '.join(given) or 'none'})")
    if target is not None and target not in TARGETS:
        raise typer.BadParameter(f"expected one of {', '.join(TARGETS)}, got {target!r}", param_hint="--target")
    if queries is not None and html_out is not None:
        raise typer.BadParameter("--html writes one query's results; it does not combine with --queries")
    params = parse_search_params(search_param)
    collection = Collection.open(index_dir, read_only=True)
    if params:
        collection.index.set_search_params(**params)
    index = collection.index
    # Loaded only for a query that needs it; a text query loads only the text side.
    engine = QueryEngine(index, lambda: collection.encoder, lambda: collection.text_queries)
    filters = Filters(os.path.abspath(path_prefix) if path_prefix else None, split, added_after)
    options = {"offset": offset, "filters": filters}
    if queries is not None:
        _run_query_file(engine, queries, target or "image", k, options, as_json)
        return
    chosen = target or ("caption" if image is not None else "image")
    _require_items(index, chosen, "this query")
    if image is not None:
        hits = engine.search_images([image], chosen, k, **options)[0]
        title, label = f"{image} → {chosen}s", str(image)
    elif item_id is not None:
        hits = engine.search_items([item_id], chosen, k, **options)[0]
        title, label = f"item {item_id} → {chosen}s", f"item:{item_id}"
    else:
        hits = engine.search_texts([query], chosen, k, **options)[0]
        title, label = f"“{query}” → {chosen}s", query
    if html_out is not None:
        write_html(html_out, title, hits, engine.index, image)
    if as_json:
        print_json({"query": label, "target": chosen, "offset": offset, "hits": [h.to_dict() for h in hits]})
    else:
        out.print(hits_table(title, hits))
    if html_out is not None:
        err.print(f"contact sheet of {len(hits)} results: {html_out}")


def _require_items(index: Index, target: str, what: str) -> None:
    """A clear error when the index holds nothing of the kind asked for, instead of an empty table."""
    info = index.info()
    if info.count(target) == 0:
        other = "caption" if target == "image" else "image"
        hint = f"; it holds {info.count(other)} {other}s: add --target {other}" if info.count(other) else ""
        raise SeesayError(f"index {index.directory} holds no {target}s to answer {what}{hint}")


def _read_queries(path: Path) -> list[str]:
    """The non-blank lines of `path` (stdin for -), stripped."""
    text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise SeesayError(f"{path} holds no queries (one per line)")
    return lines


def _run_query_file(engine: QueryEngine, path: Path, target: str, k: int, options: dict, as_json: bool) -> None:
    """Every line of `path` as a text query, encoded in batches; one table or one JSON line per query."""
    lines = _read_queries(path)
    _require_items(engine.index, target, "these queries")
    for start in range(0, len(lines), QUERY_BATCH):
        batch = lines[start : start + QUERY_BATCH]
        for text, hits in zip(batch, engine.search_texts(batch, target, k, **options)):
            if as_json:
                payload = {"query": text, "target": target, "offset": options["offset"], "hits": [h.to_dict() for h in hits]}
                typer.echo(json.dumps(payload, default=str))
            else:
                out.print(hits_table(f"“{text}” → {target}s", hits))


def write_html(path: Path, title: str, hits: list[Hit], index: Index, query_image: Optional[Path]) -> None:
    """Write the contact sheet: each hit shows its image (a caption, its image's)."""
    from retrieval.contact_sheet import render_contact_sheet, write_contact_sheet

    subtitle = f"index {index.directory} · encoder {index.info().encoder.spec}"
    write_contact_sheet(path, render_contact_sheet(title, hits, query_image=query_image, subtitle=subtitle))
