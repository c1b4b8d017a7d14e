"""`seesay serve --shards`: a router over three real shard servers (uvicorn on loopback) answers as one index would."""
from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from conftest import ColourMeanEncoder, solid_image
from retrieval.collection import Collection
from retrieval.datasets import Record
from retrieval.server.app import create_app
from retrieval.server.router import create_router_app

N_IMAGES = 300
N_QUERIES = 500


def _index(folder: Path, records: list[Record]) -> Path:
    with Collection.open_or_create(folder, ColourMeanEncoder(8)) as collection:
        assert collection.add(records, workers=1).images_added == len(records)
    return folder


@pytest.fixture(scope="module")
def indexes(tmp_path_factory) -> tuple[Path, list[Path]]:
    """One index of N_IMAGES solid-colour images, and three shards that split the same images between them."""
    root = tmp_path_factory.mktemp("sharded")
    colours = np.random.default_rng(7).integers(0, 256, size=(N_IMAGES, 3))
    records = [
        Record(f"{i:03d}.png", solid_image(root / "images" / f"{i:03d}.png", tuple(int(c) for c in rgb), size=4),
               [f"picture {i}"])
        for i, rgb in enumerate(colours)
    ]
    return _index(root / "single", records), [_index(root / f"shard{s}", records[s::3]) for s in range(3)]


class Server:
    """`seesay serve`'s app over one index, on a free loopback port, in a thread."""

    def __init__(self, index_dir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(create_app(index_dir, disk_cache=False), host="127.0.0.1", port=self.port, log_level="error")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            assert time.monotonic() < deadline, "shard server did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def shard_servers(indexes):
    servers = [Server(shard) for shard in indexes[1]]
    yield servers
    for server in servers:
        server.stop()


def client(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1")


def _png(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), tuple(int(c) for c in rgb)).save(buffer, "PNG")
    return buffer.getvalue()


def assert_same_hits(routed: list[dict], single: list[dict]) -> None:
    """The router's hits are the single index's: the same score at every rank, each item one the single index
    ranks at that score. (Near-ties within float noise, ~1e-7, may come in either order: the shards score on
    their own, smaller indexes.) `single` holds one hit more than asked, for a near-tie at the last rank."""
    assert len(routed) == len(single) - 1 or len(routed) == len(single) < 10
    for hit, expected in zip(routed, single):
        assert abs(hit["score"] - expected["score"]) < 1e-5
        assert any(other["source_id"] == hit["source_id"] and abs(other["score"] - hit["score"]) < 1e-5 for other in single)


@pytest.mark.slow  # 500 queries, each through the router and three shard servers: minutes on a loaded machine
def test_the_router_answers_as_the_single_index_does(indexes, shard_servers):
    single = client(create_app(indexes[0], disk_cache=False))
    router = client(create_router_app([server.url for server in shard_servers]))
    queries = np.random.default_rng(8).integers(0, 256, size=(N_QUERIES - 4, 3))
    for rgb in queries:  # image → image: every query has its own vector
        files = {"file": ("q.png", _png(rgb), "image/png")}
        expected = single.post("/api/search/image", files=files, data={"k": 11, "target": "image"})
        routed = router.post("/api/search/image", files=files, data={"k": 10, "target": "image"})
        assert expected.status_code == routed.status_code == 200, routed.text
        assert routed.json()["complete"]
        assert_same_hits(routed.json()["hits"], expected.json()["hits"])
    for text, offset, k in (("red", 0, 10), ("green", 5, 10), ("blue", 95, 20), ("red blue", 0, 99)):  # paging past a shard's page
        expected = single.get("/api/search/text", params={"q": text, "k": k + 1, "offset": offset})
        routed = router.get("/api/search/text", params={"q": text, "k": k, "offset": offset})
        assert_same_hits(routed.json()["hits"], expected.json()["hits"])
        assert [hit["rank"] for hit in routed.json()["hits"]] == list(range(offset + 1, offset + k + 1))
    hit = routed.json()["hits"][0]  # each hit names the shard that holds it, under that shard's id
    holder = dict(zip((server.url for server in shard_servers), indexes[1]))[hit["shard"]]
    assert client(create_app(holder, disk_cache=False)).get(f"/api/items/{hit['id']}").json()["source_id"] == hit["source_id"]


def test_a_shard_that_is_down_is_reported_never_dropped(indexes, shard_servers):
    down = "http://127.0.0.1:9"  # discard port: nothing listens
    router = client(create_router_app([*(server.url for server in shard_servers[:2]), down], timeout_s=5))
    answer = router.get("/api/search/text", params={"q": "red", "k": 10})
    assert answer.status_code == 200
    body = answer.json()
    assert body["complete"] is False
    assert [s["ok"] for s in body["shards"]] == [True, True, False] and "unreachable" in body["shards"][2]["error"]
    assert len(body["hits"]) == 10 and {hit["shard"] for hit in body["hits"]} <= {s.url for s in shard_servers[:2]}
    health = router.get("/api/health").json()
    assert health["status"] == "degraded" and [s["ok"] for s in health["shards"]] == [True, True, False]
