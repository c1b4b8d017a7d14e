"""The HTTP API of `seesay serve`, through FastAPI's TestClient, over a real index of generated images.

The index holds coloured shapes (retrieval.demo_data) embedded with the fast colour-words
bag-of-words encoder, so the right answer to each query is known.
"""
from __future__ import annotations

import base64
import io
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from helpers import build_shape_index, local_client, png_bytes, upload
from indexer import Index
from retrieval.collection import Collection
from retrieval.datasets import load_dataset
from retrieval.demo_data import draw_shape, make_shape_set
from retrieval.engine import QueryEngine
from retrieval.server.app import create_app
from retrieval.server.thumbnails import ThumbnailCache

N_IMAGES = 4 * 3 * 2  # colours × shapes × copies
N_CAPTIONS = 2 * N_IMAGES


@pytest.fixture(scope="module")
def index_dir(shape_index) -> Path:
    return shape_index


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("thumb-cache")


@pytest.fixture(scope="module")
def client(index_dir, cache_dir) -> TestClient:
    with local_client(create_app(index_dir, cache_dir=cache_dir)) as c:
        yield c


def text_search(client, q, **params):
    response = client.get("/api/search/text", params={"q": q, **params})
    assert response.status_code == 200, response.text
    return response.json()


def red_square_id(client) -> int:
    return text_search(client, "a red square", k=1)["hits"][0]["id"]


# ----- search -----


def test_text_query_returns_a_red_image_first(client):
    result = text_search(client, "a red square on a white background", k=5)
    assert result["target"] == "image" and result["query_kind"] == "text" and result["k"] == 5
    hits = result["hits"]
    assert len(hits) == 5
    first = hits[0]
    assert first["kind"] == "image" and first["rank"] == 1
    assert first["source_id"].startswith("red_"), first
    assert any("red" in caption for caption in first["captions"])
    assert first["thumbnail"] == f"/thumbnails/{first['id']}"
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_text_query_can_target_captions(client):
    hits = text_search(client, "blue", target="caption", k=3)["hits"]
    assert all(h["kind"] == "caption" for h in hits)
    assert "blue" in hits[0]["text"]
    # a caption's thumbnail is its image's
    assert hits[0]["thumbnail"] == f"/thumbnails/{hits[0]['image_id']}"


def test_uploaded_blue_circle_returns_a_blue_caption(client):
    query = png_bytes(draw_shape("blue", "circle", seed=4242))  # a new image, not one in the index
    response = upload(client, query, name="blue-circle.png", k=3)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["target"] == "caption" and result["query"] == "blue-circle.png"
    first = result["hits"][0]
    assert first["kind"] == "caption" and "blue" in first["text"], first


def test_uploaded_image_can_target_images(client):
    query = png_bytes(draw_shape("green", "triangle", seed=77), "JPEG")
    response = upload(client, query, name="g.jpg", mime="image/jpeg", target="image", k=2)
    assert response.status_code == 200, response.text
    first = response.json()["hits"][0]
    assert first["kind"] == "image" and first["source_id"].startswith("green_")


@pytest.mark.parametrize(
    "params",
    [{"q": "red", "k": 0}, {"q": "red", "k": 1000}, {"q": "red", "target": "video"}, {"q": ""}, {}],
)
def test_bad_text_query_parameters_are_422(client, params):
    response = client.get("/api/search/text", params=params)
    assert response.status_code == 422
    assert "detail" in response.json()


def test_blank_query_is_a_clear_400(client):
    response = client.get("/api/search/text", params={"q": "   "})
    assert response.status_code == 400
    assert "empty" in response.json()["detail"]


# ----- items -----


def test_item_lookup_with_captions_and_vector(client, index_dir):
    item_id = red_square_id(client)
    item = client.get(f"/api/items/{item_id}").json()
    assert item["id"] == item_id and item["kind"] == "image" and item["vector"] is None
    assert item["source_id"].startswith("red_square") and "path" not in item  # no server paths in answers
    assert {c["text"] for c in item["captions"]} == {"a red square on a white background", "the square is red"}

    with_vector = client.get(f"/api/items/{item_id}", params={"vector": "true"}).json()
    with Index.open(index_dir, read_only=True) as index:
        stored = index.vectors("image", [item_id])[0]
        dim = index.info().dim
    assert len(with_vector["vector"]) == dim
    np.testing.assert_allclose(with_vector["vector"], stored, atol=1e-6)

    caption = client.get(f"/api/items/{item['captions'][0]['id']}").json()
    assert caption["kind"] == "caption" and caption["image_id"] == item_id
    assert caption["text"] == item["captions"][0]["text"] and caption["captions"] == []


def test_unknown_item_is_404(client):
    for url in ("/api/items/999999", "/api/items/999999/similar"):
        response = client.get(url)
        assert response.status_code == 404
        assert "999999" in response.json()["detail"]
    assert client.get("/api/items/not-a-number").status_code == 422


def test_similar_from_an_image_and_from_a_caption(client):
    item_id = red_square_id(client)
    result = client.get(f"/api/items/{item_id}/similar", params={"target": "image", "k": 4}).json()
    assert result["query"] == f"item:{item_id}" and result["query_kind"] == "item"
    assert item_id not in [h["id"] for h in result["hits"]]  # the query item is no answer to itself
    assert result["hits"][0]["source_id"].startswith("red_")

    caption_id = text_search(client, "the circle is blue", target="caption", k=1)["hits"][0]["id"]
    images = client.get(f"/api/items/{caption_id}/similar", params={"k": 3}).json()["hits"]
    assert images[0]["kind"] == "image" and images[0]["source_id"].startswith("blue_")

    captions = client.get(f"/api/items/{item_id}/similar", params={"target": "caption", "k": 3}).json()["hits"]
    assert captions[0]["kind"] == "caption" and "red" in captions[0]["text"]


# ----- thumbnails -----


def test_thumbnail_by_id_is_a_cached_jpeg(client, index_dir, cache_dir):
    item_id = red_square_id(client)
    response = client.get(f"/thumbnails/{item_id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert "max-age" in response.headers["cache-control"]
    etag = response.headers["etag"]
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG" and max(image.size) <= 256
    red, green, blue = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3).mean(axis=0)
    assert red > green + 40 and red > blue + 40  # it is the red image

    small = client.get(f"/thumbnails/{item_id}", params={"size": 64})
    assert small.status_code == 200 and max(Image.open(io.BytesIO(small.content)).size) <= 64

    cache = client.app.state.service.thumbnails
    renders = cache.renders
    again = client.get(f"/thumbnails/{item_id}")
    assert again.content == response.content and cache.renders == renders  # served from memory
    assert client.get(f"/thumbnails/{item_id}", headers={"If-None-Match": etag}).status_code == 304

    on_disk = list(cache_dir.glob(f"{item_id}-256-*.jpg"))
    assert len(on_disk) == 1 and on_disk[0].read_bytes() == response.content
    assert not list(index_dir.rglob("*.jpg")), "thumbnails must not be written inside the index"

    # a fresh cache over the same folder serves from disk without rendering
    fresh = ThumbnailCache(cache_dir)
    with Index.open(index_dir, read_only=True) as index:
        path = index.items([item_id])[0].path
    assert fresh.get(item_id, path, 256).data == response.content and fresh.renders == 0


def test_thumbnail_errors(client):
    assert client.get("/thumbnails/999999").status_code == 404
    caption_id = text_search(client, "red", target="caption", k=1)["hits"][0]["id"]
    response = client.get(f"/thumbnails/{caption_id}")
    assert response.status_code == 404 and "caption" in response.json()["detail"]
    bad_size = client.get(f"/thumbnails/{red_square_id(client)}", params={"size": 5000})
    assert bad_size.status_code == 400 and "size" in bad_size.json()["detail"]


@pytest.mark.parametrize(
    "url",
    [
        "/thumbnails/..%2F..%2F..%2Fetc%2Fpasswd",
        "/thumbnails/%2e%2e/%2e%2e/etc/passwd",
        "/thumbnails/../../etc/passwd",
        "/thumbnails/%2Fetc%2Fpasswd",
        "/thumbnails/1?path=/etc/passwd&size=../../x",
        "/static/..%2F..%2F..%2Fetc%2Fpasswd",
        "/static/../app.py",
    ],
)
def test_no_path_traversal(client, url):
    response = client.get(url)
    assert response.status_code in (400, 404, 422), (url, response.status_code)
    assert b"root:" not in response.content and b"create_app" not in response.content


def test_missing_image_file_is_a_404_not_a_crash(tmp_path):
    index_dir = build_shape_index(tmp_path, copies=1)
    (tmp_path / "data" / "images" / "red_square_0.png").unlink()
    with local_client(create_app(index_dir, disk_cache=False)) as c:
        hit = c.get("/api/search/text", params={"q": "red square", "k": 6}).json()["hits"]
        gone = next(h for h in hit if h["source_id"] == "red_square_0.png")
        response = c.get(gone["thumbnail"])
        assert response.status_code == 404 and "missing" in response.json()["detail"]
        assert c.get("/api/health").json() == {"status": "ok"}


def test_thumbnail_cache_rerenders_a_replaced_file_and_bounds_memory(tmp_path):
    path = tmp_path / "a.png"
    draw_shape("red", "square").save(path)
    cache = ThumbnailCache(None, memory_bytes=10_000)
    first = cache.get(1, path, 128)
    assert cache.get(1, path, 128) is first and cache.renders == 1
    draw_shape("blue", "square").save(path)
    import os

    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert cache.get(1, path, 128).data != first.data and cache.renders == 2
    for i in range(2, 40):
        cache.get(i, path, 128)
    assert 0 < cache.memory_used <= 10_000
    with pytest.raises(FileNotFoundError):
        cache.get(99, tmp_path / "nope.png", 128)


# ----- bad uploads -----


def test_bad_uploads_are_4xx_and_the_server_keeps_serving(client):
    good = png_bytes(draw_shape("red", "circle", seed=5))
    cases = [
        (b"", 400, "empty"),
        (b"this is not an image at all", 400, "not an image"),
        (good[: len(good) // 2], 400, "truncated"),
        (b"%PDF-1.4\n" + b"0" * 500, 400, "not an image"),
    ]
    for data, status, words in cases:
        response = upload(client, data, name="bad.png")
        assert response.status_code == status, (words, response.text)
        assert words in response.json()["detail"], response.json()
        assert text_search(client, "a red square", k=1)["hits"][0]["source_id"].startswith("red_")
    assert client.post("/api/search/image", data={"k": "3"}).status_code == 422  # no file at all
    ok = upload(client, good)
    assert ok.status_code == 200 and "red" in ok.json()["hits"][0]["text"]


def test_decompression_bomb_is_refused(client):
    # 100 megapixels of 1-bit PNG: a small file that would decode to hundreds of MB
    bomb = png_bytes(Image.new("1", (10_000, 10_000)))
    assert len(bomb) < 1_000_000
    response = upload(client, bomb, name="bomb.png")
    assert response.status_code == 413
    assert "pixels" in response.json()["detail"] or "too large" in response.json()["detail"]
    assert client.get("/api/health").status_code == 200


def test_pixel_limit_is_configurable(index_dir):
    with local_client(create_app(index_dir, max_pixels=32 * 32, disk_cache=False)) as c:
        response = upload(c, png_bytes(draw_shape("red", "circle")), name="big.png")  # 64×64
        assert response.status_code == 413 and "64x64" in response.json()["detail"]


def test_oversize_upload_is_413(index_dir, client):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    data = png_bytes(noise)
    assert len(data) > 40_000
    with local_client(create_app(index_dir, max_upload_bytes=20_000, disk_cache=False)) as small:
        response = upload(small, data)
        assert response.status_code == 413
        assert "20000 bytes" in response.json()["detail"]
        # a body with no Content-Length (chunked) is counted as it arrives
        def chunks():
            for _ in range(0, 200_000, 10_000):
                yield b"x" * 10_000

        chunked = small.post(
            "/api/search/image", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert chunked.status_code == 413
        assert small.get("/api/search/text", params={"q": "red"}).status_code == 200
    # the default limit is 10 MB
    huge = upload(client, b"\x89PNG" + b"\0" * (10 * 1024 * 1024 + 100_000))
    assert huge.status_code == 413 and "10 MB" in huge.json()["detail"]


# ----- meta -----


def test_info_and_health(client):
    assert client.get("/api/health").json() == {"status": "ok"}
    info = client.get("/api/info").json()
    assert info["n_images"] == N_IMAGES and info["n_captions"] == N_CAPTIONS
    assert info["encoder"]["kind"].startswith("bow") and info["dim"] > 0
    assert info["max_upload_bytes"] == 10 * 1024 * 1024
    assert client.app.state.service.snapshot().index.read_only


def test_openapi_lists_the_endpoints(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path, method in [
        ("/api/search/text", "get"),
        ("/api/search/image", "post"),
        ("/api/items/{item_id}", "get"),
        ("/api/items/{item_id}/similar", "get"),
        ("/api/info", "get"),
        ("/api/health", "get"),
        ("/thumbnails/{item_id}", "get"),
    ]:
        assert method in paths[path], path
    assert "SearchOut" in schema["components"]["schemas"] and "HitOut" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_search_page_and_assets_are_served_locally(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset, mime in [("/static/app.js", "javascript"), ("/static/style.css", "text/css")]:
        response = client.get(asset)
        assert response.status_code == 200 and mime in response.headers["content-type"]
        assert asset in page.text
        # nothing is fetched from the internet at run time
        assert not re.search(r"""(src|href|url|import|fetch)\s*[=(]\s*["']?(https?:)?//""", response.text)
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page.text)


def test_queries_stay_consistent_while_another_writer_appends(tmp_path):
    index_dir = build_shape_index(tmp_path / "a", copies=1)
    extra = load_dataset(make_shape_set(tmp_path / "b", copies=2, seed=9)).records
    errors: list = []
    seen: list[int] = []
    with local_client(create_app(index_dir, disk_cache=False)) as c:
        stop = threading.Event()

        def reader():
            while not stop.is_set():
                r = c.get("/api/search/text", params={"q": "a yellow circle", "k": 50})
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                hits = r.json()["hits"]
                seen.append(len(hits))
                if not hits[0]["source_id"].startswith("yellow_"):
                    errors.append(hits[0])
                i = c.get("/api/info").json()
                if i["n_captions"] != 2 * i["n_images"]:
                    errors.append(i)

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            with Collection.open(index_dir) as writer:  # writable, like `seesay index` in another process
                for start in range(0, len(extra), 6):
                    writer.add(extra[start : start + 6], workers=1)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert not errors, errors[:3]
        info = c.get("/api/info").json()
        assert info["n_images"] == 12 + 24
        # the appended images are searchable through the already-running server
        hits = c.get("/api/search/text", params={"q": "a yellow circle", "k": 50}).json()["hits"]
        assert len(hits) == 36 and len(seen) > 0


# ----- the --html contact sheet -----


def test_search_html_contact_sheet(index_dir, tmp_path):
    from cli.app import app

    runner = CliRunner()
    out = tmp_path / "sheets" / "red.html"
    result = runner.invoke(app, ["search", "a red square", "--index", str(index_dir), "-k", "3", "--html", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    uris = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 3
    first = Image.open(io.BytesIO(base64.b64decode(uris[0])))
    assert first.format == "JPEG"
    assert "a red square on a white background" in page and "score " in page
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page), "the sheet must be self-contained"

    by_image = tmp_path / "blue.html"
    query = tmp_path / "q.png"
    draw_shape("blue", "circle", seed=31).save(query)
    result = runner.invoke(app, ["search", "--image", str(query), "--index", str(index_dir), "-k", "4", "--json", "--html", str(by_image)])
    assert result.exit_code == 0, result.output
    page = by_image.read_text()
    assert page.count("data:image/jpeg;base64,") == 5  # the query image and each caption's image
    assert 'data-kind="caption"' in page and "blue" in page

    escaped = tmp_path / "x.html"
    result = runner.invoke(app, ["search", "red <script>alert(1)</script>", "--index", str(index_dir), "-k", "1", "--html", str(escaped)])
    assert result.exit_code == 0, result.output
    assert "<script>" not in escaped.read_text() and "&lt;script&gt;" in escaped.read_text()


def test_unexpected_errors_are_json_500s_and_the_server_keeps_serving(index_dir, monkeypatch):
    with local_client(create_app(index_dir, disk_cache=False), raise_server_exceptions=False) as c:
        def broken(*_args, **_kw):
            raise RuntimeError("boom")

        monkeypatch.setattr(QueryEngine, "search_texts", broken)
        response = c.get("/api/search/text", params={"q": "red"})
        assert response.status_code == 500 and "internal error" in response.json()["detail"]
        assert "boom" not in response.text and "RuntimeError" not in response.text  # no exception text
        monkeypatch.undo()
        assert c.get("/api/search/text", params={"q": "red"}).status_code == 200


# ----- the command -----


def test_serve_command_binds_loopback_by_default(index_dir, tmp_path, monkeypatch):
    import uvicorn

    from cli.app import app

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda served, **kw: calls.append((served, kw)))
    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--index", str(index_dir), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    served, options = calls[0]
    assert options["host"] == "127.0.0.1" and options["port"] == 8000
    with local_client(served) as c:
        assert c.get("/api/health").status_code == 200
        assert c.app.state.service.thumbnails.disk_dir == tmp_path / "c"

    result = runner.invoke(app, ["serve", "--index", str(index_dir), "--host", "0.0.0.0", "--port", "8123", "--max-upload-mb", "1", "--no-disk-cache"])
    assert result.exit_code == 0, result.output
    assert calls[1][1]["host"] == "0.0.0.0" and calls[1][1]["port"] == 8123
    assert "warning" in result.output
    with local_client(calls[1][0]) as c:
        assert c.get("/api/info").json()["max_upload_bytes"] == 1024 * 1024
        assert c.app.state.service.thumbnails.disk_dir is None

    result = runner.invoke(app, ["serve", "--index", str(tmp_path / "no-index")])
    assert result.exit_code != 0 and "not a seesay index" in str(result.exception)


def test_search_params_that_do_not_fit_the_index_stop_the_start(index_dir, cache_dir):
    from retrieval.errors import SeesayError

    with pytest.raises(SeesayError, match="efSearch"):
        create_app(index_dir, cache_dir=cache_dir, search_params={"efSearch": 64})
