"""A self-contained HTML contact sheet of search results, for sharing without a server.

Thumbnails are embedded as base64 data URIs and the styles are inline, so the one
file opens anywhere, offline. Every piece of text is HTML-escaped.
"""
from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from retrieval.engine import Hit
from retrieval.errors import BadImageError
from retrieval.images import ImageInput
from retrieval.server.thumbnails import render_thumbnail

THUMB_SIZE = 256

_STYLE = """
:root{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;color:#1d2330;background:#f6f7fb}
body{margin:0;padding:1.5rem 2rem 3rem}
h1{font-size:1.3rem;margin:0 0 .3rem}
.sub{color:#667085;font-size:.85rem;margin-bottom:1.2rem}
.query{display:flex;gap:1rem;align-items:center;margin-bottom:1.2rem}
.query img{width:96px;height:96px;object-fit:contain;background:#fff;border:1px solid #e3e6ee;border-radius:8px}
.grid{display:grid;gap:1rem;grid-template-columns:repeat(auto-fill,minmax(190px,1fr))}
.hit{background:#fff;border:1px solid #e3e6ee;border-radius:12px;overflow:hidden;box-shadow:0 1px 2px rgba(16,24,40,.06)}
.thumb{aspect-ratio:1/1;background:#eef0f5;display:flex;align-items:center;justify-content:center;position:relative}
.thumb img{width:100%;height:100%;object-fit:contain}
.thumb .missing{color:#98a2b3;font-size:.8rem;padding:1rem;text-align:center}
.rank{position:absolute;top:.5rem;left:.5rem;padding:.1rem .45rem;border-radius:999px;background:rgba(29,35,48,.78);color:#fff;font-size:.75rem;font-weight:600}
.body{padding:.6rem .8rem .8rem}
.score{font-weight:600;font-size:.85rem;font-variant-numeric:tabular-nums}
.text{margin:.3rem 0 0;font-size:1rem}
ul{margin:.3rem 0 0;padding:0;list-style:none;font-size:.85rem;color:#344054}
li{margin:.15rem 0}
.meta{color:#667085;font-size:.75rem;margin-top:.35rem;overflow-wrap:anywhere}
"""


def data_uri(image: ImageInput, size: int = THUMB_SIZE) -> Optional[str]:
    """A JPEG thumbnail of `image` as a data: URI, or None when it cannot be read."""
    try:
        data = render_thumbnail(image, size)
    except (BadImageError, OSError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def render_contact_sheet(
    title: str,
    hits: Sequence[Hit],
    query_image: Optional[ImageInput] = None,
    subtitle: str = "",
    size: int = THUMB_SIZE,
) -> str:
    """The HTML of a contact sheet: one card per hit with its thumbnail, score and captions.

    Each card shows its hit's image file (a caption's, its image's); `query_image` is shown
    beside the title when the query was an image.
    """
    esc = html.escape
    cards = []
    for hit in hits:
        path = hit.image_path
        uri = data_uri(path, size) if path else None
        picture = (
            f'<img src="{uri}" alt="{esc(hit.item.source_id)}">'
            if uri
            else f'<span class="missing">image unavailable<br>{esc(str(path or ""))}</span>'
        )
        if hit.item.kind == "caption":
            words = f'<p class="text">“{esc(hit.item.text or "")}”</p>'
        else:
            words = "<ul>" + "".join(f"<li>{esc(c)}</li>" for c in hit.captions) + "</ul>"
        cards.append(
            f'<div class="hit" data-kind="{esc(hit.item.kind)}" data-id="{hit.item.id}">'
            f'<div class="thumb">{picture}<span class="rank">#{hit.rank}</span></div>'
            f'<div class="body"><div class="score">score {hit.score:.4f}</div>{words}'
            f'<div class="meta">{esc(hit.item.kind)} {hit.item.id} · {esc(hit.item.source_id)}</div></div></div>'
        )
    query = ""
    if query_image is not None:
        uri = data_uri(query_image, size)
        if uri:
            query = f'<div class="query"><img src="{uri}" alt="query image"><div>query image</div></div>'
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sub = " · ".join(part for part in (subtitle, f"{len(hits)} results", f"made {made} by seesay") if part)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1><div class=\"sub\">{esc(sub)}</div>{query}"
        f'<div class="grid">{"".join(cards)}</div></body></html>\n'
    )


def write_contact_sheet(path: str | Path, html_text: str) -> Path:
    """Write the sheet (creating parent folders) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_text, encoding="utf-8")
    return path
