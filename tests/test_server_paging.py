"""The API's paging and filters, and the upload endpoint's parameters in the URL, on a real served index.

Two folders of generated shapes, indexed as splits "north" and "south", embedded with the
bag-of-words encoder.
"""
from __future__ import annotations

import pytest

from helpers import build_shape_index, local_client, png_bytes
from retrieval.demo_data import draw_shape
from retrieval.server.app import create_app


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("paging")
    index_dir = build_shape_index(root, splits=("north", "south"))
    with local_client(create_app(index_dir, disk_cache=False)) as client:
        yield client, root


def search(client, **params) -> dict:
    response = client.get("/api/search/text", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def png(colour: str, shape: str) -> bytes:
    return png_bytes(draw_shape(colour, shape, seed=99))


def test_offset_pages_through_results_past_k(served):
    client, _ = served
    top = search(client, q="a red square", k=6)["hits"]
    second = search(client, q="a red square", k=3, offset=3)
    assert second["offset"] == 3 and [h["rank"] for h in second["hits"]] == [4, 5, 6]
    assert [h["id"] for h in second["hits"]] == [h["id"] for h in top[3:]]
    assert search(client, q="red", k=5, offset=48)["hits"] == []  # past the end: an empty page
    assert client.get("/api/search/text", params={"q": "red", "offset": -1}).status_code == 422
    assert client.get("/api/search/text", params={"q": "red", "offset": 10**6}).status_code == 422


def test_filters_on_split_and_path_prefix(served):
    client, root = served
    north = search(client, q="a blue circle", k=10, split="north")["hits"]
    assert len(north) == 10 and {h["split"] for h in north} == {"north"}
    assert all(h["source_id"].startswith("north/") for h in north)
    prefix = str((root / "south").resolve())
    south = search(client, q="a blue circle", k=30, target="caption", path_prefix=prefix)["hits"]
    assert south and {h["split"] for h in south} == {"south"}
    assert search(client, q="blue", path_prefix=str(root / "nowhere"))["hits"] == []
    similar = client.get(f"/api/items/{north[0]['id']}/similar", params={"split": "south", "k": 3}).json()["hits"]
    assert {h["split"] for h in similar} == {"south"}


def test_upload_takes_k_and_target_in_the_url_or_the_form(served):
    client, _ = served
    files = {"file": ("q.png", png("green", "triangle"), "image/png")}
    in_url = client.post("/api/search/image", params={"k": 2, "target": "image"}, files=files)
    assert in_url.status_code == 200, in_url.text
    body = in_url.json()
    assert (body["k"], body["target"], len(body["hits"])) == (2, "image", 2)
    assert all(h["kind"] == "image" for h in body["hits"])
    in_form = client.post("/api/search/image", data={"k": "3"}, files=files).json()
    assert (in_form["k"], in_form["target"], len(in_form["hits"])) == (3, "caption", 3)
    paged = client.post("/api/search/image", params={"k": 2, "offset": 2, "target": "image"}, files=files).json()
    assert [h["rank"] for h in paged["hits"]] == [3, 4]
    clash = client.post("/api/search/image", params={"k": 2}, data={"k": "5"}, files=files)
    assert clash.status_code == 400 and "send it once" in clash.json()["detail"]
    assert client.post("/api/search/image", params={"target": "nothing"}, files=files).status_code == 422
