"""`seesay search`: query an index with text or an image."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import JsonOpt, SearchParamOpt, err, out, parse_search_params, print_json
from cli.index import IndexOpt
from indexer import Index
from retrieval.engine import Hit, QueryEngine


def hits_table(title: str, hits: list[Hit]) -> Table:
    """Results as a table: rank, score, id, and the image path or caption text."""
    table = Table(title=title)
    for column in ("#", "score", "id", "item"):
        table.add_column(column, justify="right" if column != "item" else "left")
    for hit in hits:
        label = hit.item.path if hit.item.kind == "image" else hit.item.text
        if hit.item.kind == "image" and hit.captions:
            label = f"{label}\n[dim]{hit.captions[0]}[/dim]"
        table.add_row(str(hit.rank), f"{hit.score:.4f}", str(hit.item.id), label)
    return table


def search(
    query: Optional[str] = typer.Argument(None, help="Text to search for."),
    index_dir: Path = IndexOpt,
    image: Optional[Path] = typer.Option(None, "--image", help="Search with this image instead of text."),
    k: int = typer.Option(10, "-k", "--k", help="Number of results."),
    target: Optional[str] = typer.Option(None, "--target", help="image | caption (default: images for text, captions for an image)."),
    as_json: bool = JsonOpt,
    html_out: Optional[Path] = typer.Option(None, "--html", help="Also write the results as a self-contained HTML contact sheet (thumbnails embedded) to this file."),
    search_param: list[str] = SearchParamOpt,
) -> None:
    """Text → images (or captions), or image → captions (or images)."""
    if (query is None) == (image is None):
        raise typer.BadParameter("give either a text query or --image FILE, not both or neither")
    params = parse_search_params(search_param)
    index = Index.open(index_dir, read_only=True)
    if params:
        index.set_search_params(**params)
    engine = QueryEngine(index)
    if image is not None:
        chosen = target or "caption"
        hits = engine.search_images([image], chosen, k)[0]
        title = f"{image} → {chosen}s"
    else:
        chosen = target or "image"
        hits = engine.search_texts([query], chosen, k)[0]
        title = f"“{query}” → {chosen}s"
    if html_out is not None:
        write_html(html_out, title, hits, engine.index, image)
    if as_json:
        print_json({"query": query or str(image), "target": chosen, "hits": [h.to_dict() for h in hits]})
    else:
        out.print(hits_table(title, hits))
    if html_out is not None:
        err.print(f"contact sheet of {len(hits)} results: {html_out}")


def write_html(path: Path, title: str, hits: list[Hit], index: Index, query_image: Optional[Path]) -> None:
    """Write the contact sheet: images show their own file, captions their image's."""
    from retrieval.contact_sheet import render_contact_sheet, write_contact_sheet

    image_ids = sorted({h.item.image_item_id for h in hits if h.item.kind == "caption" and h.item.image_item_id is not None})
    paths = {item.id: item.path for item in index.items(image_ids)} if image_ids else {}

    def image_path_of(hit: Hit) -> Optional[str]:
        return hit.item.path if hit.item.kind == "image" else paths.get(hit.item.image_item_id)

    subtitle = f"index {index.directory} · encoder {index.info()['encoder']['spec']}"
    write_contact_sheet(path, render_contact_sheet(title, hits, image_path_of, query_image=query_image, subtitle=subtitle))
