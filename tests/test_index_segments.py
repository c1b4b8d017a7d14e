"""Segments: many commits search exactly like one index, merges, tombstones, hash look-ups, the format-1, -2 and -3 migrations."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, text

from index_checks import assert_consistent, database_url, to_format_3
from indexer import Index, NewItem, hash_keys
from indexer.compaction import FANOUT, plan, tier
from indexer.errors import SeesayError
from indexer.items import BuiltBy
from indexer.store import SegmentRow

DIM = 16
REPO = Path(__file__).resolve().parent.parent


def artefact(folder: Path) -> BuiltBy:
    folder.mkdir(parents=True, exist_ok=True)
    return BuiltBy("test-random", "test-random#0", 1, DIM)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def image_rows(start: int, n: int) -> list[NewItem]:
    return [NewItem("image", f"img{i}", f"h{i}") for i in range(start, start + n)]


def add_images(index: Index, rng: np.random.Generator, start: int, n: int, captions: bool = False) -> None:
    rows = image_rows(start, n)
    if captions:
        rows += [NewItem("caption", f"img{i}", f"c{i}", text=f"caption {i}", image_hash=f"h{i}") for i in range(start, start + n)]
    index.add_vectors(rows, unit(rng, len(rows)))


def exact_truth(index: Index, kind: str, queries: np.ndarray, k: int) -> np.ndarray:
    ids, vectors = index.all_vectors(kind)
    scores = queries @ vectors.T
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_many_segments_search_like_one_index(tmp_path: Path, db_url, factory: str) -> None:
    rng = np.random.default_rng(0)
    directory = tmp_path / "idx"
    queries = unit(rng, 25)
    with Index.create(directory, artefact, factory=factory, db_url=db_url) as index:
        for commit in range(9):
            add_images(index, rng, 40 * commit, 40, captions=True)
        assert index.info().segments == {"image": 9, "caption": 9}
        images = assert_consistent(directory)["image"]
        gone = [images[i] for i in rng.choice(len(images), 50, replace=False)]
        assert index.delete(gone) == 100  # each image takes its caption along
        assert index.info().tombstones == 100
        if factory != "Flat":
            index.set_search_params(nprobe=3)
        segmented = {kind: index.search(kind, queries, 10) for kind in ("image", "caption")}
        assert not set(gone) & set(segmented["image"][1].ravel().tolist())
        if factory == "Flat":
            np.testing.assert_array_equal(segmented["image"][1], exact_truth(index, "image", queries, 10))
        sql = assert_consistent(directory)
        assert index.compact(everything=True) == 18
        assert index.info().segments == {"image": 1, "caption": 1} and index.info().tombstones == 0
        assert assert_consistent(directory) == sql
        for kind, (scores, ids) in segmented.items():
            merged_scores, merged_ids = index.search(kind, queries, 10)
            np.testing.assert_array_equal(merged_ids, ids)
            np.testing.assert_allclose(merged_scores, scores, rtol=1e-5)
        # more rows than live items: padded after the last hit
        if factory != "Flat":
            index.set_search_params(nprobe=8)  # every list
        _, ids = index.search("image", queries[:1], 400)
        assert sorted(ids[0][ids[0] >= 0].tolist()) == sql["image"] and (ids[0][len(sql["image"]):] == -1).all()
        np.testing.assert_allclose(index.vectors("image", sql["image"][:3]), index.all_vectors("image")[1][:3])
        with pytest.raises(SeesayError, match=str(gone[0])):
            index.vectors("image", [gone[0]])


def test_the_policy_merges_a_full_tier_and_rewrites_mostly_deleted_segments(tmp_path: Path, db_url) -> None:
    rng = np.random.default_rng(1)
    directory = tmp_path / "idx"
    with Index.create(directory, artefact, db_url=db_url) as index:
        for commit in range(FANOUT - 1):
            add_images(index, rng, 20 * commit, 20)
        assert index.info().segments["image"] == FANOUT - 1
        add_images(index, rng, 20 * (FANOUT - 1), 20)  # the tier is full: one segment of 320, merged in the background
        index.wait_for_merges()
        assert index.info().segments["image"] == 1
        add_images(index, rng, 1000, 20)
        ids = assert_consistent(directory)["image"]
        index.delete(ids[:5])  # a few of the big one: tombstones until a merge rewrites it
        index.wait_for_merges()
        assert index.info().tombstones == 5
        index.delete(ids[-10:])  # half of the last segment: the policy rewrites it in the background now
        index.wait_for_merges()
        info = index.info()
        assert info.segments["image"] == 2 and info.tombstones == 5
        assert_consistent(directory)
        add_images(index, rng, 2000, 20)
        index.wait_for_merges()
        assert index.info().segments["image"] == 3 and index.info().tombstones == 5
        assert_consistent(directory)


def test_plan_by_tiers() -> None:
    def seg(i: int, rows: int, dead: int = 0) -> SegmentRow:
        return SegmentRow(id=i, kind="image", rows=rows, dead=dead, first_id=i * 1000, part=False)

    assert [tier(n) for n in (0, 15, 16, 255, 256, 8192, 131072)] == [0, 0, 1, 1, 2, 3, 4]
    small = [seg(i, 8192) for i in range(FANOUT)]
    assert plan(small[:-1]) == []
    assert [[s.id for s in group] for group in plan(small)] == [[s.id for s in small]]
    assert [[s.id for s in g] for g in plan([seg(1, 100_000), seg(2, 100, dead=40)])] == [[2]]
    assert [[s.id for s in g] for g in plan([seg(1, 100_000), seg(2, 100)], everything=True)] == [[1, 2]]
    assert plan([seg(1, 100)], everything=True) == []


def to_format_1(directory: Path) -> None:
    """Rewrite a format-4 SQLite index as format 1 wrote it: generation files, no segments, no id counter."""
    with Index.open(directory) as index:
        index.compact(everything=True)
        generation = index.generation
        for kind, name in (("image", "images"), ("caption", "captions")):
            ids, vectors = index.all_vectors(kind)
            flat = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
            flat.add_with_ids(vectors, ids)
            faiss.write_index(flat, str(directory / f"{name}.g{generation}.faiss"))
            np.save(directory / f"{name}.g{generation}.npy", vectors)
            np.save(directory / f"{name}.g{generation}.ids.npy", ids)
    for path in directory.glob("*.s*.*npy"):
        path.unlink()
    to_format_3(directory)
    with sqlite3.connect(directory / "meta.sqlite") as db:
        db.execute("DROP TABLE segments")
        db.execute("DROP TABLE tombstones")
        db.execute("ALTER TABLE manifest DROP COLUMN next_segment")
    meta = json.loads((directory / "index.json").read_text())
    (directory / "index.json").write_text(json.dumps({**meta, "version": 1}))


def test_format_1_is_refused_read_only_and_migrated_by_compact(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    directory = tmp_path / "idx"
    queries = unit(rng, 5)
    with Index.create(directory, artefact) as index:
        add_images(index, rng, 0, 30, captions=True)
        add_images(index, rng, 30, 30, captions=True)
        before = index.search("caption", queries, 7)
    to_format_1(directory)
    with pytest.raises(SeesayError, match=r"format version 1 must be migrated.*seesay compact --index"):
        Index.open(directory, read_only=True)
    done = subprocess.run(
        [sys.executable, "-m", "cli.app", "compact", "--index", str(directory), "--json"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["segments"] == {"image": 1, "caption": 1}
    assert json.loads((directory / "index.json").read_text())["version"] == 4
    assert not list(directory.glob("*.g*.npy"))
    assert_consistent(directory)
    with Index.open(directory, read_only=True) as reopened:
        np.testing.assert_array_equal(reopened.search("caption", queries, 7)[1], before[1])
        assert reopened.info().n_images == 60


def test_a_reader_keeps_its_segments_while_a_merge_replaces_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    directory = tmp_path / "idx"
    queries = unit(rng, 4)
    with Index.create(directory, artefact) as writer:
        for commit in range(5):
            add_images(writer, rng, 10 * commit, 10)
        with Index.open(directory, read_only=True) as reader:
            before = reader.search("image", queries, 5)
            writer.compact(everything=True)
            assert len(list(directory.glob("images.s*.ids.npy"))) == 1
            np.testing.assert_array_equal(reader.search("image", queries, 5)[1], before[1])  # its loaded snapshot
            assert reader.refresh()
            np.testing.assert_array_equal(reader.search("image", queries, 5)[1], before[1])


def test_a_background_merge_blocks_neither_the_next_commit_nor_deletes(tmp_path: Path, db_url, monkeypatch) -> None:
    """While the policy's merge writes its segment (held here mid-write), adds and deletes commit;
    the merged segment then replaces its group and keeps the deletes made meanwhile as tombstones."""
    import indexer.index as index_module
    import threading

    started, release = threading.Event(), threading.Event()
    real_write = index_module.write_merged

    def held_write(*args, **kwargs):
        started.set()
        assert release.wait(60)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(index_module, "write_merged", held_write)
    rng = np.random.default_rng(4)
    directory = tmp_path / "idx"
    queries = unit(rng, 6)
    with Index.create(directory, artefact, db_url=db_url) as index:
        for commit in range(FANOUT):
            add_images(index, rng, 20 * commit, 20)
        assert started.wait(60)  # the 16th commit started a merge of the 16 segments
        first = sorted(index.all_vectors("image")[0].tolist())  # (assert_consistent would wait for the merge)
        add_images(index, rng, 1000, 20)  # commits while the merge is held
        assert index.delete(first[:3] + first[-2:]) == 5
        assert index.info().segments["image"] == FANOUT + 1
        assert list(directory.glob(".merging-*"))
        release.set()
        index.wait_for_merges()
        info = index.info()
        assert info.segments["image"] == 2 and info.tombstones == 5
        sql = assert_consistent(directory)
        assert len(sql["image"]) == 20 * FANOUT + 20 - 5
        np.testing.assert_array_equal(index.search("image", queries, 10)[1], exact_truth(index, "image", queries, 10))
        assert not set(first[:3] + first[-2:]) & set(index.search("image", queries, 400)[1].ravel().tolist())


def test_a_merge_whose_group_was_retired_meanwhile_changes_nothing(tmp_path: Path, db_url, monkeypatch) -> None:
    """A merge that finds its group retired when it swaps its segment in changes nothing. The merge lock
    normally rules this out; here it is bypassed (as a writer that does not see it would) and the
    first merge is held mid-write while another writer merges the same segments."""
    import contextlib
    import threading

    import indexer.index as index_module

    started, release = threading.Event(), threading.Event()
    real_write = index_module.write_merged

    def held_write(*args, **kwargs):
        if not started.is_set():  # only the first merge waits
            started.set()
            assert release.wait(60)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(index_module, "write_merged", held_write)
    monkeypatch.setattr(index_module, "merge_lock", lambda directory, wait=True: contextlib.nullcontext(True))
    rng = np.random.default_rng(5)
    directory = tmp_path / "idx"
    with Index.create(directory, artefact, db_url=db_url) as index, Index.open(directory, db_url=db_url) as other:
        for commit in range(3):
            add_images(index, rng, 20 * commit, 20)
        generation = index.info().generation
        merged: list[int] = []
        first = threading.Thread(target=lambda: merged.append(index.compact(everything=True)))
        first.start()
        assert started.wait(60)
        assert other.compact(everything=True) == 3  # another writer merges them first
        release.set()
        first.join(60)
        assert merged == [0]
        assert index.info().segments["image"] == 1 and index.info().generation == generation + 1
        assert len(assert_consistent(directory)["image"]) == 60


def test_a_closed_writable_index_is_freed_with_its_loaded_segments(tmp_path: Path) -> None:
    """The background merger holds its index weakly: dropping the last reference frees the loaded
    segments at once, not whenever the cycle collector runs (a 1M-vector index holds gigabytes)."""
    import gc
    import weakref

    rng = np.random.default_rng(6)
    gc.disable()
    try:
        with Index.create(tmp_path / "idx", artefact) as index:
            add_images(index, rng, 0, 30)
            index.search("image", unit(rng, 2), 5)
        freed = weakref.ref(index)
        del index
        assert freed() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("colliding", [False, True])
def test_hash_lookups_across_segments_merges_and_deletes(tmp_path: Path, db_url, monkeypatch, colliding: bool) -> None:
    """Hashes are found in every committed segment, before and after merges; a deleted item's hash
    is free again (and gets a new id). With every key the same (`colliding`), each look-up finds
    candidates everywhere, which the stored hashes tell apart."""
    if colliding:
        monkeypatch.setattr(hash_keys, "keys_of", lambda hashes: np.zeros(len(hashes), dtype=np.int64))
    rng = np.random.default_rng(5)
    with Index.create(tmp_path / "idx", artefact, db_url=db_url) as index:
        for commit in range(FANOUT):  # the 16th commit makes the policy merge them in the background
            add_images(index, rng, 10 * commit, 10, captions=True)
        first = index.ids_by_hash("image", ["h0", "h155", "nowhere"])
        assert set(first) == {"h0", "h155"}
        index.wait_for_merges()
        assert index.info().segments["image"] == 1
        assert index.ids_by_hash("image", ["h0", "h155", "nowhere"]) == first
        assert index.ids_by_hash("caption", ["c7"]) and not index.ids_by_hash("caption", ["h7"])  # kinds apart
        again = index.add_vectors(image_rows(0, 3), unit(rng, 3))  # already indexed: nothing stored twice
        assert again.ids == [None] * 3 and again.existing == [0, 1, 2]
        index.delete([first["h0"]])  # its caption goes with it
        assert index.ids_by_hash("image", ["h0"]) == {} and index.ids_by_hash("caption", ["c0"]) == {}
        back = index.add_vectors(image_rows(0, 1) + [NewItem("caption", "img0", "c0", text="back", image_hash="h0")], unit(rng, 2))
        assert back.ids[0] > max(first.values()) and index.ids_by_hash("image", ["h0"]) == {"h0": back.ids[0]}
        assert index.captions_of(back.ids[0])[0].text == "back"
        # Ten images indexed already, two new; captions of a new one (in this add) and of an indexed one.
        captions = [NewItem("caption", "img161", "c161", text="new", image_hash="h161"), NewItem("caption", "img155", "x155", text="also", image_hash="h155")]
        more = index.add_vectors(image_rows(150, 12) + captions, unit(rng, 14))
        assert more.existing == list(range(10)) and None not in more.ids[10:] and not more.orphaned
        assert [c.text for c in index.captions_of(more.ids[11])] == ["new"]
        assert [c.text for c in index.captions_of(first["h155"])] == ["caption 155", "also"]
        assert index.ids_by_hash("image", ["h155", "h161", "nowhere"]) == {"h155": first["h155"], "h161": more.ids[11]}
        index.wait_for_merges()
        assert index.verify(deep=True) == []
    assert_consistent(tmp_path / "idx")


def test_deep_verify_names_a_wrong_hash_key_table(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    with Index.create(tmp_path / "idx", artefact) as index:
        add_images(index, rng, 0, 20)
        assert index.verify(deep=True) == []
        [path] = (tmp_path / "idx").glob("images.s*.hashes.npy")
        table = np.load(path)
        np.save(path, table[:, 1:])  # one row's key lost: its hash could be added twice
        assert index.verify() == []  # only the deep check reads the table
        assert index.verify(deep=True) == [f"{path} does not hold the content hashes of its segment's rows"]


def to_format_2(directory: Path) -> None:
    """Make a format-4 index look as format 2 left it: no id counter, no hash key tables, a unique (kind, hash) constraint."""
    to_format_3(directory)
    for path in directory.glob("*.hashes.npy"):
        path.unlink()
    url = database_url(directory)
    if url.startswith("sqlite"):
        db = sqlite3.connect(directory / "meta.sqlite", isolation_level=None)
        create, counter = db.execute("SELECT sql FROM sqlite_master WHERE name = 'items'").fetchone()[0], db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'items'"
        ).fetchone()[0]
        indexes = [sql for (sql,) in db.execute("SELECT sql FROM sqlite_master WHERE tbl_name = 'items' AND type = 'index'")]
        old = create.replace("CREATE TABLE items", "CREATE TABLE items_format_2").rstrip()[:-1] + ", UNIQUE (kind, hash))"
        db.execute("PRAGMA foreign_keys=OFF")
        copy = ["INSERT INTO items_format_2 SELECT * FROM items", "DROP TABLE items", "ALTER TABLE items_format_2 RENAME TO items"]
        for statement in ["BEGIN", old, *copy, *indexes]:
            db.execute(statement)
        db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'items'", (counter,))
        db.execute("COMMIT")
        db.close()
    else:
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE items ADD CONSTRAINT items_kind_hash_key UNIQUE (kind, hash)"))
        engine.dispose()
    meta = json.loads((directory / "index.json").read_text())
    (directory / "index.json").write_text(json.dumps({**meta, "version": 2}))


def unique_constraints(directory: Path) -> list:
    engine = create_engine(database_url(directory))
    try:
        return inspect(engine).get_unique_constraints("items")
    finally:
        engine.dispose()


def test_format_2_is_migrated_to_hash_key_tables(tmp_path: Path, db_url) -> None:
    rng = np.random.default_rng(6)
    directory = tmp_path / "idx"
    queries = unit(rng, 5)
    with Index.create(directory, artefact, db_url=db_url) as index:
        add_images(index, rng, 0, 30, captions=True)
        add_images(index, rng, 30, 30, captions=True)
        last = index.ids_by_hash("caption", ["c59"])["c59"]  # the largest id given
        index.delete([index.ids_by_hash("image", ["h59"])["h59"]])  # tombstones; the id counter is past the rows left
        before = index.search("caption", queries, 7)
        found = index.ids_by_hash("image", ["h0", "h31"])
    to_format_2(directory)
    assert unique_constraints(directory)
    with pytest.raises(SeesayError, match=r"format version 2 must be migrated.*seesay compact --index"):
        Index.open(directory, read_only=True)
    with Index.open(directory) as index:
        assert json.loads((directory / "index.json").read_text())["version"] == 4
        assert not unique_constraints(directory)
        assert index.ids_by_hash("image", ["h0", "h31", "h59"]) == found
        np.testing.assert_array_equal(index.search("caption", queries, 7)[1], before[1])
        assert_consistent(directory)
        again = index.add_vectors(image_rows(0, 1) + image_rows(59, 1), unit(rng, 2))
        assert again.existing == [0] and again.ids[1] == last + 1  # the deleted one's hash is free, its ids are not
    assert_consistent(directory)


def test_format_3_is_read_as_it_is_and_migrated_to_the_manifest_id_counter(tmp_path: Path, db_url) -> None:
    rng = np.random.default_rng(7)
    directory = tmp_path / "idx"
    with Index.create(directory, artefact, db_url=db_url) as index:
        add_images(index, rng, 0, 30, captions=True)
        [last] = index.add_vectors(image_rows(30, 1), unit(rng, 1)).ids  # the largest id given
        index.delete([last])
        index.compact(everything=True)  # its tombstone goes: only the database's own counter remembers the id
        queries = unit(rng, 5)
        before = index.search("image", queries, 5)
    to_format_3(directory)
    with Index.open(directory, read_only=True) as reader:  # readers never need the counter
        assert reader.info().format_version == 3
        np.testing.assert_array_equal(reader.search("image", queries, 5)[1], before[1])
    assert json.loads((directory / "index.json").read_text())["version"] == 3
    engine = create_engine(database_url(directory))
    with engine.begin() as connection:  # what a crash after the column's commit leaves: the counter not set yet
        connection.execute(text("ALTER TABLE manifest ADD COLUMN next_id INTEGER NOT NULL DEFAULT 0"))
    engine.dispose()
    with Index.open(directory, db_url=db_url) as index:
        assert json.loads((directory / "index.json").read_text())["version"] == 4
        assert index.info().format_version == 4
        assert index.add_vectors(image_rows(31, 1), unit(rng, 1)).ids == [last + 1]
        assert index.reserve_ids(2) == [last + 2, last + 3]
    meta = json.loads((directory / "index.json").read_text())
    (directory / "index.json").write_text(json.dumps({**meta, "version": 3}))  # a crash before index.json was rewritten
    with Index.open(directory, db_url=db_url) as index:
        assert index.reserve_ids(1) == [last + 4]  # the counter set is kept, not set again from the rows
        assert index.verify(deep=True) == []
    assert_consistent(directory)


def test_verify_looks_again_when_a_merge_commits_while_it_reads(tmp_path: Path) -> None:
    """A merge (another process's, or this one's in the background) retires the files verify just listed."""
    rng = np.random.default_rng(0)
    with Index.create(tmp_path / "idx", artefact) as index:
        for commit in range(3):
            add_images(index, rng, 10 * commit, 10)
        with Index.open(tmp_path / "idx") as other:
            snapshot = index._db.snapshot
            merged = []

            def snapshot_then_merge(*args, **kwargs):
                state = snapshot(*args, **kwargs)
                if not merged:  # the first look only: the other writer merges the segments it lists
                    merged.append(other.compact(everything=True))
                return state

            index._db.snapshot = snapshot_then_merge
            assert index.verify(deep=True) == []
            assert merged and merged[0] > 0, "the merge this test needs did not happen"
