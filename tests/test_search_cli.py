"""`seesay search` as a user drives it: what results show, pages, filters, many queries, search by id.

The index holds solid-colour PNGs in two folders, embedded with the colour-words test
encoder (conftest), so the right answer to each query is known.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from conftest import solid_image

runner = CliRunner()

# name: (folder, colour, captions); the two reds share a caption text.
IMAGES = {
    "red1.png": ("holiday", (250, 10, 10), ["a red thing", "scarlet"]),
    "red2.png": ("work", (230, 30, 20), ["a red thing", "crimson"]),
    "green.png": ("holiday", (10, 240, 10), ["a green thing"]),
    "blue.png": ("work", (10, 10, 250), ["a blue thing"]),
    "purple.png": ("work", (160, 20, 200), ["a purple thing"]),
}


def invoke(*args: object, stdin: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=stdin)


def run(*args: object, stdin: str | None = None) -> str:
    result = invoke(*args, stdin=stdin)
    assert result.exit_code == 0, result.output
    return result.stdout


def search_json(index: Path, *args: object) -> list[dict]:
    return json.loads(run("search", "--index", index, *args, "--json"))["hits"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rows = ["image,caption"]
    for name, (folder, rgb, captions) in IMAGES.items():
        solid_image(root / folder / name, rgb)
        rows += [f"{folder}/{name},{caption}" for caption in captions]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    (root / "holiday.txt").write_text("holiday/red1.png\nholiday/green.png\n")
    (root / "work.txt").write_text("work/red2.png\nwork/blue.png\nwork/purple.png\n")
    return root


@pytest.fixture(scope="module")
def index(photos, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("index") / "i"
    for split in ("holiday", "work"):
        run("index", "--encoder", "test-colour:8", "--data", photos / "captions.csv", "--images", photos,
            "--split-file", photos / f"{split}.txt", "--index", directory, "--json")
    return directory


def test_caption_hits_show_their_image_in_json_and_table(index):
    hits = search_json(index, "scarlet red", "--target", "caption", "-k", "3")
    images = {h["id"]: h for h in search_json(index, "red", "-k", "5")}
    for hit in hits:
        assert hit["kind"] == "caption" and hit["image_id"] in images
        assert hit["path"] == images[hit["image_id"]]["path"] and Path(hit["path"]).is_file()
    table = run("search", "--index", index, "crimson red", "--target", "caption", "-k", "1")
    assert "red" in table and f"(image {hits[0]['image_id']})" in table and ".png" in table


def test_duplicate_captions_come_back_once(index):
    texts = [h["text"] for h in search_json(index, "red", "--target", "caption", "-k", "8")]
    assert texts.count("a red thing") == 1 and len(texts) == len(set(texts)) == 6


def test_search_by_item_id_never_returns_the_item_itself(index):
    red = search_json(index, "red", "-k", "1")[0]
    similar = search_json(index, "--id", red["id"], "-k", "4")
    assert red["id"] not in [h["id"] for h in similar] and len(similar) == 4
    assert Path(similar[0]["path"]).name.startswith("red")  # the other red is the most like it
    captions = search_json(index, "--id", red["id"], "--target", "caption", "-k", "2")
    assert all(h["kind"] == "caption" for h in captions)
    unknown = invoke("search", "--index", index, "--id", 999)
    assert unknown.exit_code != 0 and "999" in str(unknown.exception or unknown.output)


def test_offset_pages_through_the_ranking(index):
    everything = search_json(index, "red", "-k", "5")
    first = search_json(index, "red", "-k", "2")
    second = json.loads(run("search", "--index", index, "red", "-k", "2", "--offset", "2", "--json"))
    assert second["offset"] == 2
    assert [h["id"] for h in first + second["hits"]] == [h["id"] for h in everything[:4]]
    assert [h["rank"] for h in second["hits"]] == [3, 4]
    assert search_json(index, "red", "-k", "2", "--offset", "5") == []


def test_filters_on_path_prefix_and_split(index, photos, monkeypatch):
    work = search_json(index, "red", "-k", "5", "--path-prefix", photos / "work")
    assert {Path(h["path"]).parent.name for h in work} == {"work"} and len(work) == 3
    assert search_json(index, "red", "--path-prefix", photos / "wo") == []  # a folder, not a string prefix
    single = search_json(index, "red", "--path-prefix", photos / "work" / "blue.png")
    assert [Path(h["path"]).name for h in single] == ["blue.png"]
    monkeypatch.chdir(photos)  # a relative prefix means a folder under the working directory
    holiday = search_json(index, "red", "-k", "5", "--path-prefix", "holiday")
    assert sorted(Path(h["path"]).name for h in holiday) == ["green.png", "red1.png"]
    captions = search_json(index, "red", "--target", "caption", "-k", "9", "--split", "holiday")
    assert {h["split"] for h in captions} == {"holiday"} and len(captions) == 3
    assert {Path(h["path"]).parent.name for h in captions} == {"holiday"}


def test_a_file_of_queries_runs_in_one_process(index, tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_text("red\n\ngreen\nblue\n")
    lines = run("search", "--index", index, "--queries", queries, "-k", "2", "--json").splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["query"] for r in results] == ["red", "green", "blue"]
    assert [Path(r["hits"][0]["path"]).stem.rstrip("12") for r in results] == ["red", "green", "blue"]
    from_stdin = run("search", "--index", index, "--queries", "-", "-k", "1", stdin="blue\nred\n")
    assert from_stdin.count("→ images") == 2 and "blue.png" in from_stdin
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert invoke("search", "--index", index, "--queries", empty).exit_code != 0


def test_one_kind_of_query_at_a_time(index, tmp_path):
    both = invoke("search", "--index", index, "red", "--id", 1)
    assert both.exit_code == 2 and "a text query and --id" in both.output
    html = invoke("search", "--index", index, "--queries", tmp_path, "--html", tmp_path / "x.html")
    assert html.exit_code == 2 and "--queries" in html.output


def test_an_index_without_captions_says_so_to_an_image_query(photos, tmp_path):
    folder = tmp_path / "bare"
    solid_image(folder / "red.png", (255, 0, 0))
    solid_image(folder / "blue.png", (0, 0, 255))
    run("index", "--encoder", "test-colour:8", "--data", folder, "--index", tmp_path / "i")
    result = invoke("search", "--index", tmp_path / "i", "--image", folder / "red.png")
    assert result.exit_code != 0
    message = str(result.exception)
    assert "holds no captions" in message and "--target image" in message
    hits = search_json(tmp_path / "i", "--image", folder / "blue.png", "--target", "image", "-k", "2")
    assert [Path(h["path"]).name for h in hits] == ["red.png"]  # the query file itself is left out


def test_search_by_id_needs_no_model(photos, tmp_path):
    directory = tmp_path / "i"
    run("index", "--encoder", "test-colour:8", "--data", photos / "captions.csv", "--images", photos, "--index", directory)
    red = search_json(directory, "red", "-k", "1")[0]
    shutil.rmtree(directory / "encoder")  # no model to load: only stored vectors can answer
    assert len(search_json(directory, "--id", red["id"], "-k", "2")) == 2
    text = invoke("search", "--index", directory, "red")
    assert text.exit_code != 0 and "encoder" in str(text.exception)
