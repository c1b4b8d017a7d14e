"""The server under hostile and odd requests: bounded work, no stalls, no leaks, typed errors.

Each test reproduces one finding of issue 11 against a real index of generated shapes.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import build_shape_index, local_client, png_bytes, upload
from indexer import Index
from retrieval.collection import Collection
from retrieval.datasets import load_dataset
from retrieval.demo_data import draw_shape, make_shape_set
from retrieval.server.app import create_app
from retrieval.server.hosts import host_name

HUGE_ID = 2**63


@pytest.fixture(scope="module")
def index_dir(shape_index) -> Path:
    return shape_index


@pytest.fixture(scope="module")
def client(index_dir):
    with local_client(create_app(index_dir, disk_cache=False), raise_server_exceptions=False) as c:
        yield c


def test_a_20000x1_png_is_refused_at_once(client):
    strip = png_bytes(Image.new("RGB", (20000, 1)))
    assert len(strip) < 1000
    started = time.perf_counter()
    response = upload(client, strip, name="strip.png")
    assert response.status_code == 400, response.text
    assert "aspect ratio" in response.json()["detail"] and "20000x1" in response.json()["detail"]
    assert time.perf_counter() - started < 2
    assert client.get("/api/health").status_code == 200


def test_searches_run_while_an_upload_is_being_encoded(index_dir, monkeypatch):
    """No lock is held across encoding: a text search finishes while an image encode is stuck."""
    entered, release = threading.Event(), threading.Event()
    with local_client(create_app(index_dir, disk_cache=False)) as c:
        encoder = c.app.state.service.encoder
        real = type(encoder).encode_images

        def slow(self, images, *args, **kwargs):
            entered.set()
            assert release.wait(30), "the test never released the encoder"
            return real(self, images, *args, **kwargs)

        monkeypatch.setattr(type(encoder), "encode_images", slow)
        answers: list = []
        uploader = threading.Thread(
            target=lambda: answers.append(upload(c, png_bytes(draw_shape("red", "circle", seed=3)), k=2))
        )
        uploader.start()
        try:
            assert entered.wait(30)
            started = time.perf_counter()
            for url in ("/api/search/text?q=red", "/api/info", "/api/items/1", "/api/items/1/similar"):
                assert c.get(url).status_code == 200, url
            assert time.perf_counter() - started < 10  # the old server lock held these until the encode ended
        finally:
            release.set()
            uploader.join(60)
        assert answers and answers[0].status_code == 200, answers


@pytest.mark.parametrize("url", ["/api/items/{}", "/api/items/{}/similar", "/thumbnails/{}"])
@pytest.mark.parametrize("item_id", [HUGE_ID, 2**64 + 5, 10**30, -1])
def test_ids_out_of_range_are_422_without_exception_text(client, url, item_id):
    response = client.get(url.format(item_id))
    assert response.status_code == 422, response.text
    assert "Overflow" not in response.text and "Traceback" not in response.text


@pytest.mark.parametrize("url", ["/api/items/{}", "/api/items/{}/similar", "/thumbnails/{}"])
def test_the_largest_id_is_a_plain_404(client, url):
    response = client.get(url.format(HUGE_ID - 1))
    assert response.status_code == 404 and response.json() == {"detail": f"no indexed item with id {HUGE_ID - 1}"}


def _largest_image_id(index_dir: Path) -> int:
    with sqlite3.connect(index_dir / "meta.sqlite") as db:
        return db.execute("SELECT max(id) FROM items WHERE kind = 'image'").fetchone()[0]


def test_appended_items_answer_at_once_without_a_search_first(tmp_path):
    index_dir = build_shape_index(tmp_path / "a", copies=1)
    extra = load_dataset(make_shape_set(tmp_path / "b", copies=1, seed=5)).records
    with local_client(create_app(index_dir, disk_cache=False)) as c:
        assert c.get("/api/search/text", params={"q": "red"}).status_code == 200  # serving the first generation
        first_new = _largest_image_id(index_dir) + 1
        with Collection.open(index_dir) as writer:
            writer.add(extra[:2], workers=1)
        new_id = _largest_image_id(index_dir)
        assert new_id >= first_new
        item = c.get(f"/api/items/{new_id}", params={"vector": "true"})
        assert item.status_code == 200, item.text
        assert len(item.json()["vector"]) == c.get("/api/info").json()["dim"]
        similar = c.get(f"/api/items/{new_id}/similar", params={"k": 3, "target": "image"})
        assert similar.status_code == 200, similar.text
        assert new_id not in [h["id"] for h in similar.json()["hits"]]  # an item is no answer to itself
        everything = c.get("/api/search/text", params={"q": "red", "k": 100}).json()["hits"]
        assert new_id in [h["id"] for h in everything]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "", "localhost.:80"])
def test_requests_for_other_host_names_are_refused(client, host):
    """DNS rebinding: a page on another name that resolves to 127.0.0.1 must not read the API."""
    for url in ("/api/search/text?q=red", "/api/info", "/", "/thumbnails/1", "/openapi.json"):
        response = client.get(url, headers={"Host": host})
        assert response.status_code == 400, (host, url)
        assert "host" in response.json()["detail"]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000"])
def test_loopback_host_names_are_served(client, host):
    assert client.get("/api/health", headers={"Host": host}).status_code == 200


def test_host_names_parse():
    assert [host_name(h) for h in ("[::1]:80", "[::1]", "a.b:1", "A.B", "::1")] == ["::1", "::1", "a.b", "a.b", "::1"]


def test_any_host_when_asked(index_dir):
    with local_client(create_app(index_dir, disk_cache=False, allowed_hosts=None)) as c:
        assert c.get("/api/health", headers={"Host": "photos.example"}).status_code == 200
    with local_client(create_app(index_dir, disk_cache=False, allowed_hosts=["photos.example"])) as c:
        assert c.get("/api/health", headers={"Host": "photos.example:443"}).status_code == 200
        assert c.get("/api/health", headers={"Host": "127.0.0.1"}).status_code == 400


def test_no_server_paths_in_any_answer(client, index_dir):
    root = str(index_dir.parent)
    image_id = client.get("/api/search/text", params={"q": "red", "k": 1}).json()["hits"][0]["id"]
    urls = [
        "/api/search/text?q=red&k=5",
        "/api/search/text?q=red&target=caption",
        "/api/info",
        f"/api/items/{image_id}",
        f"/api/items/{image_id}/similar?target=caption",
    ]
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, url
        assert root not in response.text and "/tmp" not in response.text, (url, response.text[:300])
    answer = upload(client, png_bytes(draw_shape("red", "circle", seed=1)), k=3)
    assert answer.status_code == 200 and root not in answer.text


def test_a_broken_index_is_a_503_that_names_no_file(tmp_path):
    index_dir = build_shape_index(tmp_path, copies=1)
    with local_client(create_app(index_dir, disk_cache=False), raise_server_exceptions=False) as c:
        assert c.get("/api/search/text", params={"q": "red"}).status_code == 200
        c.app.state.service.snapshot().index.close()
        for path in index_dir.glob("meta.sqlite*"):
            path.unlink()
        (index_dir / "meta.sqlite").write_bytes(b"not a database" * 100)
        response = c.get("/api/info")
        assert response.status_code == 503, response.text
        assert str(tmp_path) not in response.text and "sqlite" not in response.text.lower()


def test_thumbnail_of_an_unreadable_file_names_no_path(tmp_path):
    index_dir = build_shape_index(tmp_path, copies=1)
    with Index.open(index_dir, read_only=True) as index:
        image = index.items([1])[0]
    Path(image.path).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with local_client(create_app(index_dir, disk_cache=False)) as c:
        response = c.get("/thumbnails/1")
        assert response.status_code == 404 and "cannot be read" in response.json()["detail"]
        assert str(tmp_path) not in response.text


def test_bounded_query_sizes(client):
    assert client.get("/api/search/text", params={"q": "red " * 600}).status_code == 422
    assert client.get("/api/search/text", params={"q": "red", "k": 101}).status_code == 422
    assert upload(client, png_bytes(draw_shape("red", "circle")), k=101).status_code == 422


def test_queries_beyond_the_slots_wait_then_get_a_503(index_dir):
    app = create_app(index_dir, disk_cache=False, query_slots=1)
    service = app.state.service
    service.query_slot.wait_s = 0.2
    with local_client(app) as c:
        with service.query_slot():  # the only slot is taken
            busy = c.get("/api/search/text", params={"q": "red"})
        assert busy.status_code == 503 and "busy" in busy.json()["detail"] and busy.headers["retry-after"]
        assert c.get("/api/search/text", params={"q": "red"}).status_code == 200
