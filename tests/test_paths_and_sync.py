"""An index outlives the folder it was made from: relative paths, moved files, deleted files, exports.

Everything goes through the CLI (typer's runner, in this process, with the colour-words test
encoder from conftest) on real PNG files, a real SQLite file and real FAISS indexes.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cli.app import app
from conftest import solid_image
from indexer import Index
from retrieval.server.app import create_app

runner = CliRunner()
COLOURS = {"red": (250, 10, 10), "green": (10, 240, 10), "blue": (10, 10, 250)}


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def run(*args: object) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.stdout


def run_json(*args: object) -> dict:
    return json.loads(run(*args, "--json"))


def hits(index: Path, *args: object) -> list[dict]:
    return run_json("search", "--index", index, *args)["hits"]


def photo_folder(folder: Path) -> Path:
    """red/green/blue PNGs, each with a sidecar caption naming its colour."""
    for name, rgb in COLOURS.items():
        solid_image(folder / f"{name}.png", rgb)
        (folder / f"{name}.txt").write_text(f"a {name} square")
    return folder


def test_an_index_made_from_relative_paths_works_from_another_folder(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    photo_folder(work / "photos")
    elsewhere.mkdir()
    (work / "dbs").mkdir()
    monkeypatch.chdir(work)
    run("index", "--encoder", "test-colour:8", "--data", "photos", "--index", "idx", "--db-url", "sqlite:///dbs/meta.db")
    recorded = json.loads((work / "idx" / "index.json").read_text())["db_url"]
    assert recorded == f"sqlite:///{work / 'dbs' / 'meta.db'}"  # resolved when the index was made

    monkeypatch.chdir(elsewhere)
    index = Path("../work/idx")
    found = hits(index, "red", "-k", "3")
    assert [Path(h["path"]).name for h in found][0] == "red.png"
    assert all(Path(h["path"]).is_absolute() and Path(h["path"]).is_file() for h in found)
    run("search", "--index", index, "green", "-k", "3", "--html", "sheet.html")
    sheet = Path("sheet.html").read_text()
    assert sheet.count('<img src="data:image/jpeg;base64,') == 3 and "image unavailable" not in sheet
    with TestClient(create_app(index, disk_cache=False), base_url="http://127.0.0.1") as client:
        for hit in found:
            response = client.get(f"/thumbnails/{hit['id']}")
            assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"


def test_update_follows_new_deleted_moved_and_recaptioned_files(tmp_path):
    photos = photo_folder(tmp_path / "photos")
    index = tmp_path / "idx"
    run("index", "--encoder", "test-colour:8", "--data", photos, "--index", index)
    before = {Path(h["path"]).name: h for h in hits(index, "red", "-k", "3")}

    (photos / "red.png").rename(photos / "old-red.png")  # moved: same content, new name
    (photos / "red.txt").rename(photos / "old-red.txt")
    (photos / "green.png").unlink()  # deleted
    (photos / "blue.txt").write_text("a deep blue square")  # re-captioned
    solid_image(photos / "more" / "purple.png", (150, 10, 200))  # new
    report = run_json("update", "--index", index)
    assert (report["moved"], report["images_added"]) == (1, 1)
    assert report["removed"] == 3  # green with its caption; blue's old caption
    assert report["captions_added"] == 1

    after = {Path(h["path"]).name: h for h in hits(index, "red", "-k", "5")}
    assert set(after) == {"old-red.png", "blue.png", "purple.png"}
    assert after["old-red.png"]["id"] == before["red.png"]["id"]  # the same item, re-pointed
    assert after["old-red.png"]["captions"] == ["a red square"]
    assert after["blue.png"]["captions"] == ["a deep blue square"]
    again = run_json("update", "--index", index)
    assert (again["moved"], again["removed"], again["images_added"], again["captions_added"]) == (0, 0, 0, 0)


def test_update_without_a_recorded_dataset_asks_for_one(tmp_path):
    photos = photo_folder(tmp_path / "photos")
    index = tmp_path / "idx"
    run("index", "--encoder", "test-colour:8", "--data", photos, "--index", index)
    (index / "sources.json").unlink()  # as an index made before sources were kept
    result = invoke("update", "--index", index)
    assert result.exit_code != 0 and "--data" in str(result.exception)
    assert run_json("update", "--index", index, "--data", photos)["removed"] == 0


def test_prune_and_delete_by_path(tmp_path):
    photos = photo_folder(tmp_path / "photos")
    solid_image(photos / "sub" / "grey.png", (128, 128, 128))
    index = tmp_path / "idx"
    run("index", "--encoder", "test-colour:8", "--data", photos, "--index", index)
    (photos / "red.png").unlink()
    dry = run_json("prune", "--index", index, "--dry-run")
    assert dry["missing"] == [str(photos / "red.png")] and dry["deleted"] == 0
    assert run_json("prune", "--index", index)["deleted"] == 2  # the image and its caption
    assert run_json("delete", "--index", index, "--path", photos / "sub")["deleted"] == 1
    assert run_json("delete", "--index", index, "--path", photos / "blue.png")["deleted"] == 2
    left = [Path(h["path"]).name for h in hits(index, "red", "-k", "5")]
    assert left == ["green.png"]
    nothing = invoke("delete", "--index", index, "--path", photos / "nowhere")
    assert nothing.exit_code != 0 and "nothing deleted" in str(nothing.exception)


def test_export_writes_embeddings_and_metadata_as_parquet(tmp_path):
    photos = photo_folder(tmp_path / "photos")
    index = tmp_path / "idx"
    run("index", "--encoder", "test-colour:8", "--data", photos, "--index", index, "--split-file", _split(tmp_path))
    assert run_json("export", "--index", index, "--out", tmp_path / "out" / "all.parquet")["rows"] == 6
    table = pq.read_table(tmp_path / "out" / "all.parquet")
    assert json.loads(table.schema.metadata[b"seesay"])["dim"] == 8
    rows = table.to_pylist()
    images = {r["id"]: r for r in rows if r["kind"] == "image"}
    captions = [r for r in rows if r["kind"] == "caption"]
    assert len(images) == 3 and len(captions) == 3
    assert all(c["path"] == images[c["image_id"]]["path"] and c["text"].startswith("a ") for c in captions)
    assert {r["split"] for r in rows} == {"mine"} and all(r["added_at"] is not None for r in rows)
    with Index.open(index, read_only=True) as opened:
        for kind in ("image", "caption"):
            ids = [r["id"] for r in rows if r["kind"] == kind]
            stored = opened.vectors(kind, ids)
            np.testing.assert_array_equal(np.array([r["embedding"] for r in rows if r["kind"] == kind], np.float32), stored)
    only = run_json("export", "--index", index, "--out", tmp_path / "captions.parquet", "--kind", "caption")
    assert only["rows"] == 3 and not list(tmp_path.glob("**/*.tmp"))


def _split(tmp_path: Path) -> Path:
    split = tmp_path / "mine.txt"
    split.write_text("red.png\ngreen.png\nblue.png\n")
    return split


def test_factory_on_an_existing_index_is_refused_not_ignored(tmp_path):
    photos = photo_folder(tmp_path / "photos")
    index = tmp_path / "idx"
    made = invoke("index", "--encoder", "test-colour:8", "--data", photos, "--index", index, "--factory", "IVF2,Flat")
    assert made.exit_code == 0
    # 3 images and 3 captions train 2 lists: no note; the same factory again is fine
    assert "cannot be trained" not in made.output
    run("index", "--encoder", "test-colour:8", "--data", photos, "--index", index, "--factory", "IVF2,Flat")
    run("index", "--encoder", "test-colour:8", "--data", photos, "--index", index)
    other = invoke("index", "--encoder", "test-colour:8", "--data", photos, "--index", index, "--factory", "HNSW32")
    assert other.exit_code != 0
    assert re.search(r"made with FAISS factory 'IVF2,Flat'.*only applies when an index is created", str(other.exception))
    db = invoke("index", "--encoder", "test-colour:8", "--data", photos, "--index", index, "--db-url", f"sqlite:///{tmp_path / 'x.db'}")
    assert db.exit_code != 0 and "database URL only applies" in str(db.exception)


def test_an_ivf_index_too_small_to_train_still_answers_and_says_so(tmp_path):
    photos = photo_folder(tmp_path / "photos")
    index = tmp_path / "idx"
    made = invoke("index", "--encoder", "test-colour:8", "--data", photos, "--index", index, "--factory", "IVF16,Flat")
    assert made.exit_code == 0, made.output
    assert "cannot be trained until it has 13 more images, 13 more captions" in made.stderr
    assert "exact" in made.stderr
    assert [Path(h["path"]).name for h in hits(index, "blue", "-k", "1")] == ["blue.png"]
    assert hits(index, "green", "--target", "caption", "-k", "1")[0]["text"] == "a green square"


def test_image_to_image_leaves_out_the_query_file_itself(tmp_path):
    photos = photo_folder(tmp_path / "photos")
    solid_image(photos / "red2.png", (230, 30, 30))
    index = tmp_path / "idx"
    run("index", "--encoder", "test-colour:8", "--data", photos, "--index", index)
    shutil.copy(photos / "red.png", tmp_path / "copy-of-red.png")
    for query in (photos / "red.png", tmp_path / "copy-of-red.png"):
        found = [Path(h["path"]).name for h in hits(index, "--image", query, "--target", "image", "-k", "2")]
        assert found[0] == "red2.png" and "red.png" not in found


def test_added_after_keeps_only_newer_items(tmp_path):
    photos = photo_folder(tmp_path / "photos")
    index = tmp_path / "idx"
    run("index", "--encoder", "test-colour:8", "--data", photos, "--index", index)
    with Index.open(index, read_only=True) as opened:
        cut = max(item.added_at for item in opened.images_under())
    solid_image(tmp_path / "later" / "maroon.png", (120, 0, 0))
    run("index", "--encoder", "test-colour:8", "--data", tmp_path / "later", "--index", index)
    stamp = cut.replace(tzinfo=None).isoformat(timespec="microseconds")  # UTC
    newer = hits(index, "red", "-k", "5", "--added-after", stamp)
    assert [Path(h["path"]).name for h in newer] == ["maroon.png"]
    assert len(hits(index, "red", "-k", "5", "--added-after", "2000-01-01")) == 4
    assert hits(index, "red", "-k", "5", "--added-after", "2999-01-01") == []
