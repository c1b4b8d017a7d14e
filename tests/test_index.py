"""The on-disk index: real images, a real SQLite file and real FAISS indexes."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import faiss
import numpy as np
import pytest

import indexer.index as index_module
from conftest import ColourMeanEncoder, solid_image
from index_checks import assert_consistent
from indexer import Index, Item, ItemNotFoundError
from retrieval.collection import Collection
from retrieval.datasets import Record
from retrieval.encoders.base import read_manifest
from retrieval.errors import IndexMismatchError, SeesayError
from retrieval.ingest import AddReport

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """Solid red/green/blue files plus a corrupt, a truncated and a missing one."""
    folder = tmp_path / "images"
    paths = {
        "red": solid_image(folder / "red.png", RED),
        "green": solid_image(folder / "green.jpg", GREEN),
        "blue": solid_image(folder / "blue.png", BLUE),
    }
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).bytes(300))
    paths["corrupt"] = corrupt
    whole = solid_image(folder / "whole.jpg", (10, 200, 30), size=64).read_bytes()
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    paths["truncated"] = truncated
    paths["missing"] = folder / "missing.png"
    return paths


def colour_records(images: dict[str, Path]) -> list[Record]:
    return [
        Record("red.png", images["red"], ["a red square", "red"], "train"),
        Record("green.jpg", images["green"], ["a green square"], "train"),
        Record("blue.png", images["blue"], ["a blue square", "  "], "test"),
    ]


def text_query(index: Collection, text: str) -> np.ndarray:
    return index.encoder.encode_texts([text])


def top_sources(index: Collection, kind: str, text: str, k: int = 1) -> list[str]:
    _, ids = index.index.search(kind, text_query(index, text), k)
    return [item.source_id for item in index.index.items([i for i in ids[0] if i >= 0])]


@pytest.fixture
def built(tmp_path: Path, images: dict[str, Path], colour_encoder: ColourMeanEncoder, db_url) -> tuple[Collection, AddReport]:
    index = Collection.create(tmp_path / "idx", colour_encoder, db_url=db_url)
    report = index.add(colour_records(images))
    yield index, report
    index.close()


def test_create_add_search_and_reopen(built, tmp_path: Path, db_url) -> None:
    index, report = built
    directory = tmp_path / "idx"
    assert (report.images_added, report.captions_added) == (3, 4)
    assert report.problems == ["blue.png: caption 2 is empty"]
    assert "added 3 images and 4 captions" in report.summary()
    assert_consistent(directory)

    assert top_sources(index, "image", "red") == ["red.png"]
    assert top_sources(index, "image", "something blue") == ["blue.png"]
    assert top_sources(index, "caption", "green", k=1) == ["green.jpg"]
    scores, ids = index.index.search("image", text_query(index, "red"), 5)
    assert ids.shape == scores.shape == (1, 5)
    assert (ids[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()
    assert scores[0, 0] == pytest.approx(1.0)

    red = index.index.items([ids[0, 0]])[0]
    assert red == Item(red.id, "image", "red.png", str(tmp_path / "images" / "red.png"), None, None, "train")
    captions = index.index.captions_of(red.id)
    assert [c.text for c in captions] == ["a red square", "red"]
    assert all(c.image_item_id == red.id and c.kind == "caption" for c in captions)
    np.testing.assert_allclose(index.index.vectors("image", [red.id])[0, :3], [1, 0, 0], atol=1e-6)

    info = index.index.info()
    assert (info.n_images, info.n_captions, info.generation) == (3, 4, 1)
    assert info.factory == "Flat" and info.metric == "ip" and info.dim == 8
    assert info.db_url.endswith("meta.sqlite") if db_url is None else info.db_url == db_url
    # One segment per kind from the one commit; Flat keeps no FAISS file (the vectors are the index).
    assert set(info.files) == {f"{name}.{ext}" for name in ("images.s0", "captions.s1") for ext in ("npy", "ids.npy", "hashes.npy")}
    assert info.segments == {"image": 1, "caption": 1} and info.tombstones == 0
    assert json.loads((directory / "index.json").read_text())["db_url"] == db_url
    assert read_manifest(directory / "encoder")["kind"] == "test-colour"
    index.close()

    with Collection.open(directory, read_only=True) as reopened:
        assert isinstance(reopened.encoder, ColourMeanEncoder) and reopened.encoder.dim == 8
        assert top_sources(reopened, "image", "blue") == ["blue.png"]
        assert top_sources(reopened, "caption", "red", k=2) == ["red.png", "red.png"]


def test_bad_files_are_reported_and_skipped(tmp_path: Path, images, colour_encoder, db_url) -> None:
    records = [
        Record(name, images[name], [f"{name} caption"]) for name in ("corrupt", "truncated", "missing", "red")
    ]
    with Collection.create(tmp_path / "idx", colour_encoder, db_url=db_url) as index:
        report = index.add(records, batch_size=2)
        assert (report.images_added, report.captions_added) == (1, 1)
        assert len(report.problems) == 3
        for name, reason in (("corrupt", "not an image"), ("truncated", "truncated"), ("missing", "no such file")):
            [line] = [p for p in report.problems if p.startswith(f"{name}:")]
            assert str(images[name]) in line and reason in line
        assert "3 problems" in report.summary()
        assert_consistent(tmp_path / "idx")


def test_readding_skips_by_content_hash(built, tmp_path: Path, images) -> None:
    index, _ = built
    again = index.add(colour_records(images))
    assert (again.images_added, again.captions_added) == (0, 0)
    assert (again.images_skipped_existing, again.captions_skipped_existing) == (3, 4)
    generation = index.index.info().generation

    copy = tmp_path / "elsewhere" / "red-copy.png"
    copy.parent.mkdir()
    copy.write_bytes(images["red"].read_bytes())
    more = index.add([Record("red-copy.png", copy, ["RED  again", "a  RED square"])])
    assert (more.images_added, more.images_skipped_existing) == (0, 1)
    assert (more.captions_added, more.captions_skipped_existing) == (1, 1)  # case/space-normalised duplicate
    assert index.index.info().generation == generation + 1
    red = index.index.items(index.index.search("image", text_query(index, "red"), 1)[1][0])[0]
    assert red.source_id == "red.png"
    assert [c.text for c in index.index.captions_of(red.id)] == ["a red square", "red", "RED  again"]
    assert_consistent(tmp_path / "idx")


def test_delete_image_takes_its_captions(built, tmp_path: Path) -> None:
    index, _ = built
    directory = tmp_path / "idx"
    red_id = index.index.search("image", text_query(index, "red"), 1)[1][0, 0]
    red_captions = [c.id for c in index.index.captions_of(red_id)]
    blue_caption = index.index.search("caption", text_query(index, "blue"), 1)[1][0, 0]
    highest = max(max(ids) for ids in assert_consistent(directory).values())

    with pytest.raises(SeesayError, match=r"\[9999\]"):
        index.index.delete([red_id, 9999])
    assert len(assert_consistent(directory)["image"]) == 3

    assert index.index.delete([red_id, blue_caption]) == 4
    sql = assert_consistent(directory)
    assert red_id not in sql["image"] and not set(red_captions + [blue_caption]) & set(sql["caption"])
    _, ids = index.index.search("image", text_query(index, "red"), 5)
    assert red_id not in ids
    _, ids = index.index.search("caption", text_query(index, "red"), 5)
    assert not set(red_captions) & set(ids[0].tolist())
    assert index.index.captions_of(red_id) == []
    with pytest.raises(SeesayError, match=str(red_id)):
        index.index.items([red_id])
    index.close()

    with Collection.open(directory) as reopened:
        _, ids = reopened.index.search("image", text_query(reopened, "red"), 5)
        assert sorted(i for i in ids[0] if i >= 0) == sql["image"]
        assert reopened.index.info().n_captions == 1
        # A deleted id is never reused.
        reopened.add([Record("red2", solid_image(tmp_path / "red2.png", (250, 5, 5)), [])])
        assert max(assert_consistent(directory)["image"]) > highest


def test_ivf_trains_once_it_has_enough_vectors(tmp_path: Path, images, colour_encoder, db_url) -> None:
    directory = tmp_path / "idx"
    with Collection.create(directory, colour_encoder, factory="IVF4,Flat", db_url=db_url) as index:
        index.add(colour_records(images))
        assert_consistent(directory)
        # 3 images cannot train 4 lists: until a 4th comes, an exact scan answers.
        assert index.index.training_shortfall() == {"image": 1}
        found = top_sources(index, "image", "red", k=5)
        assert found[0] == "red.png" and sorted(found) == ["blue.png", "green.jpg", "red.png"]
        assert top_sources(index, "caption", "blue") == ["blue.png"]  # 4 captions: trained

        shades = [
            Record(f"shade{i}", solid_image(tmp_path / f"shade{i}.png", (40 * i, 255 - 30 * i, 20 * i)), [])
            for i in range(6)
        ]
        index.add(shades)
        sql = assert_consistent(directory)
        assert index.index.training_shortfall() == {}
        assert top_sources(index, "image", "red") == ["red.png"]

        index.index.set_search_params(nprobe=4)
        assert index.index.info().search_params == {"nprobe": 4}
        with pytest.raises(SeesayError, match="efSearch"):
            index.index.set_search_params(efSearch=64)

        red_id = index.index.search("image", text_query(index, "red"), 1)[1][0, 0]
        index.index.delete([red_id])
        after = assert_consistent(directory)
        assert after["image"] == [i for i in sql["image"] if i != red_id]
        _, ids = index.index.search("image", text_query(index, "red"), 20)
        assert sorted(i for i in ids[0] if i >= 0) == after["image"]


def test_hnsw_delete_is_a_tombstone(tmp_path: Path, images, colour_encoder, db_url) -> None:
    directory = tmp_path / "idx"
    with Collection.create(directory, colour_encoder, factory="HNSW16", db_url=db_url) as index:
        index.add(colour_records(images))
        red_id = index.index.search("image", text_query(index, "red"), 1)[1][0, 0]
        index.index.delete([red_id])
        sql = assert_consistent(directory)
        assert red_id not in sql["image"]
        _, ids = index.index.search("image", text_query(index, "red"), 5)
        assert sorted(i for i in ids[0] if i >= 0) == sql["image"]
    with Collection.open(directory, read_only=True) as reopened:
        assert reopened.index.info().n_images == 2
        assert top_sources(reopened, "image", "green") == ["green.jpg"]


def test_crash_before_commit_keeps_old_state(built, tmp_path: Path, monkeypatch) -> None:
    index, _ = built
    directory = tmp_path / "idx"
    before = assert_consistent(directory)
    real_write = index_module.write_segment

    def write_then_crash(*args, **kwargs) -> None:
        real_write(*args, **kwargs)
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(index_module, "write_segment", write_then_crash)
    new = Record("teal", solid_image(tmp_path / "teal.png", (0, 128, 128)), ["teal"])
    with pytest.raises(KeyboardInterrupt):
        index.add([new])
    orphan = directory / "images.s2.npy"
    assert orphan.exists()  # the segment the crash left, which no commit names
    monkeypatch.undo()

    with Collection.open(directory, read_only=True) as reader:
        assert reader.index.info().generation == 1
        assert sorted(reader.index.search("image", text_query(reader, "red"), 9)[1][0][:3]) == before["image"]
    with Collection.open(directory):
        assert not orphan.exists()
        assert assert_consistent(directory) == before
    assert sorted(index.index.search("image", text_query(index, "red"), 9)[1][0][:3]) == before["image"]
    assert index.add([new]).images_added == 1
    assert len(assert_consistent(directory)["image"]) == 4


def test_interrupted_long_run_keeps_finished_chunks(tmp_path: Path, colour_encoder, monkeypatch, db_url) -> None:
    records = [
        Record(f"c{i}", solid_image(tmp_path / f"c{i}.png", (20 * i, 10, 255 - 20 * i)), [f"colour {i}"])
        for i in range(7)
    ]
    calls = []

    def flaky(images, batch_size=64, progress=False):
        calls.append(len(images))
        if len(calls) == 3:
            raise RuntimeError("GPU fell over")
        return ColourMeanEncoder.encode_images(colour_encoder, images)

    directory = tmp_path / "idx"
    with Collection.create(directory, colour_encoder, db_url=db_url) as index:
        monkeypatch.setattr(colour_encoder, "encode_images", flaky)
        with pytest.raises(RuntimeError, match="GPU fell over"):
            index.add(records, commit_every=2)
        assert len(assert_consistent(directory)["image"]) == 4
        monkeypatch.undo()
        report = index.add(records, commit_every=2, progress=True)
        assert (report.images_skipped_existing, report.images_added, report.captions_added) == (4, 3, 3)
        assert len(assert_consistent(directory)["caption"]) == 7
        # One segment per kind per commit (four commits), no other files.
        assert index.index.info().segments == {"image": 4, "caption": 4}
        assert len(list(directory.glob("images.s*.ids.npy"))) == 4


def test_reader_follows_writer_with_refresh(built, tmp_path: Path, colour_encoder) -> None:
    writer, _ = built
    with Collection.open(tmp_path / "idx", read_only=True) as reader:
        assert reader.index.search("image", text_query(reader, "red"), 1)[1][0, 0] >= 0
        assert reader.index.refresh() is False
        writer.add([Record("teal", solid_image(tmp_path / "teal.png", (0, 128, 128)), ["teal"])])
        writer.add([Record("navy", solid_image(tmp_path / "navy.png", (0, 0, 128)), ["navy"])])
        assert (reader.index.search("image", text_query(reader, "red"), 9)[1][0] >= 0).sum() == 3
        assert reader.index.refresh() is True
        assert (reader.index.search("image", text_query(reader, "red"), 9)[1][0] >= 0).sum() == 5


def test_read_only_refuses_writes(built, tmp_path: Path, images) -> None:
    with Collection.open(tmp_path / "idx", read_only=True) as reader:
        with pytest.raises(SeesayError, match="read-only: cannot add"):
            reader.add(colour_records(images))
        with pytest.raises(SeesayError, match="read-only: cannot delete"):
            reader.index.delete([1])
    assert_consistent(tmp_path / "idx")


def test_mismatches_are_refused(built, tmp_path: Path, images) -> None:
    index, _ = built
    directory = tmp_path / "idx"
    with pytest.raises(IndexMismatchError, match=r"'test-colour:8#[0-9a-f]{16}' \(dim 8\).*'test-colour:6' \(dim 6\)"):
        Collection.open_or_create(directory, ColourMeanEncoder(6))
    with pytest.raises(IndexMismatchError, match="dim 8"):
        index.index.search("image", np.ones((1, 6), dtype=np.float32), 1)
    with Collection.open_or_create(directory, ColourMeanEncoder(8)) as same:
        assert same.index.info().n_images == 3

    class Misshapen(ColourMeanEncoder):
        def encode_images(self, images, batch_size=64, progress=False):
            return super().encode_images(images)[:, :5]

    with Collection(Index.open(directory), Misshapen(8)) as reopened:
        new = Record("teal", solid_image(tmp_path / "teal.png", (0, 128, 128)), ["teal"])
        with pytest.raises(IndexMismatchError, match=r"shape \(1, 5\).*dim 8"):
            reopened.add([new])
    assert len(assert_consistent(directory)["image"]) == 3


def test_open_and_create_errors(built, tmp_path: Path, colour_encoder) -> None:
    with pytest.raises(SeesayError, match="already holds a seesay index"):
        Collection.create(tmp_path / "idx", colour_encoder)
    with pytest.raises(SeesayError, match="not a seesay index"):
        Collection.open(tmp_path / "images")
    with pytest.raises(SeesayError, match="bad FAISS factory string 'Nope'"):
        Collection.create(tmp_path / "other", colour_encoder, factory="Nope")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    (tmp_path / "idx" / "index.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(SeesayError, match="version 99"):
        Collection.open(tmp_path / "idx")
    with pytest.raises(SeesayError, match="unknown item kind 'video'"):
        built[0].index.search("video", np.ones((1, 8), dtype=np.float32), 1)


def test_custom_database_url(tmp_path: Path, images, colour_encoder) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.sqlite'}"
    directory = tmp_path / "idx"
    with Collection.create(directory, colour_encoder, db_url=url) as index:
        index.add(colour_records(images))
    assert json.loads((directory / "index.json").read_text())["db_url"] == url
    assert not (directory / "meta.sqlite").exists()
    with Collection.open(directory, read_only=True) as reopened:
        assert reopened.index.info().db_url == url
        assert top_sources(reopened, "image", "green") == ["green.jpg"]
    with sqlite3.connect(tmp_path / "elsewhere.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("factory, on_gpu", [("Flat", True), ("IVF2,Flat", True), ("HNSW16", False)])
def test_search_uses_a_gpu_copy_where_the_type_has_one(tmp_path, images, colour_encoder, monkeypatch, factory, on_gpu):
    copied = []

    def to_gpus(index):
        copied.append(index)
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus)
    with Collection.create(tmp_path / "idx", colour_encoder, factory=factory) as index:
        index.add(colour_records(images))
        assert top_sources(index, "image", "green") == ["green.jpg"]
        index.add([Record("navy", solid_image(tmp_path / "navy.png", (0, 0, 128)), [])])
        assert sorted(top_sources(index, "image", "blue", k=2)) == ["blue.png", "navy"]  # a tie
        assert len(copied) == (2 if on_gpu else 0)  # a fresh copy after each change


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs a GPU")
def test_gpu_search_matches_cpu(built) -> None:
    index, _ = built
    queries = index.encoder.encode_texts(["red", "green", "blue"])
    scores, ids = index.index.search("image", queries, 3)
    stored_ids, stored = index.index.all_vectors("image")
    cpu_scores = np.sort(queries @ stored.T, axis=1)[:, ::-1][:, :3]
    cpu_ids = stored_ids[np.argsort(-(queries @ stored.T), axis=1, kind="stable")[:, :3]]
    np.testing.assert_array_equal(ids, cpu_ids)
    np.testing.assert_allclose(scores, cpu_scores, atol=1e-5)


def test_captions_by_image_answers_many_images_in_one_call(built) -> None:
    index, _ = built
    image_ids = [int(i) for i in index.index.search("image", index.encoder.encode_texts(["red"]), 3)[1][0]]
    together = index.index.captions_by_image(image_ids + [987654])
    assert {i: [c.id for c in caps] for i, caps in together.items()} == {
        i: [c.id for c in index.index.captions_of(i)] for i in image_ids if index.index.captions_of(i)
    }
    assert sum(len(caps) for caps in together.values()) == 4 and 987654 not in together


def test_a_search_s_hits_and_their_captions_come_in_one_read(built) -> None:
    index, _ = built
    images = [int(i) for i in index.index.search("image", index.encoder.encode_texts(["red"]), 3)[1][0]]
    captions = [int(i) for i in index.index.search("caption", index.encoder.encode_texts(["red"]), 2)[1][0]]
    hits = images + captions  # both kinds: only the images' captions come back
    listed, by_image = index.index.items_and_captions(hits)
    assert listed == index.index.items(hits)
    assert by_image == index.index.captions_by_image(hits)
    with pytest.raises(ItemNotFoundError, match="987654"):
        index.index.items_and_captions(hits + [987654])


def test_rows_with_tabs_line_breaks_backslashes_and_nulls_come_back_as_stored(tmp_path: Path, db_url) -> None:
    """PostgreSQL takes rows by COPY text, whose separators and escapes are these characters."""
    from datetime import datetime, timezone

    from indexer import NewItem
    from indexer.items import BuiltBy

    def artefact(folder: Path) -> BuiltBy:
        folder.mkdir(parents=True, exist_ok=True)
        return BuiltBy("test-random", "test-random#0", 1, 4)

    awkward = ["a\tb", "line\nbreak\r\n", "back\\slash\\N", "\\N", "", "ünïcödé ✓", "c:\\path\\to\\file.jpg"]
    rows = [NewItem("image", f"src{i}", f"h{i}", path=text or None, split="train" if i % 2 else None) for i, text in enumerate(awkward)]
    rows += [NewItem("caption", f"src{i}", f"c{i}", text=text, image_hash=f"h{i}") for i, text in enumerate(awkward)]
    with Index.create(tmp_path / "idx", artefact, db_url=db_url) as index:
        added = index.add_vectors(rows, np.eye(4, dtype=np.float32)[np.arange(len(rows)) % 4])
        stored = index.items(added.ids)
    assert [(item.kind, item.source_id, item.path, item.text, item.split) for item in stored] == [
        (row.kind, row.source_id, row.path, row.text, row.split) for row in rows
    ]
    assert [item.image_item_id for item in stored[len(awkward):]] == added.ids[: len(awkward)]
    now = datetime.now(timezone.utc)
    assert all(item.added_at.tzinfo is not None and abs((item.added_at - now).total_seconds()) < 600 for item in stored)  # UTC
