"""Consistency checks of an index directory, read straight from its database and segment files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import create_engine, text

from indexer import hash_keys
from indexer.merging import merge_lock

SEGMENT_FILE = re.compile(r"^(images|captions)\.s(\d+)\.(npy|ids\.npy|hashes\.npy|faiss)$")


def faiss_ids(index: faiss.Index) -> np.ndarray:
    """Every id a FAISS index holds, whether it keeps them in an IDMap or in IVF lists."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(index.id_map)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(ivf.nlist)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def database_url(directory: Path) -> str:
    """The metadata database of the index in `directory`, as index.json names it."""
    url = json.loads((directory / "index.json").read_text()).get("db_url")
    return url or f"sqlite:///{directory / 'meta.sqlite'}"


def to_format_3(directory: Path) -> None:
    """Make a format-4 index look as format 3 left it: no id counter in the manifest, and the
    database's own counter (SQLite's AUTOINCREMENT, PostgreSQL's sequence) at the last id given,
    where format 3 kept it; other databases had none."""
    engine = create_engine(database_url(directory))
    try:
        with engine.begin() as connection:
            last = connection.execute(text("SELECT next_id FROM manifest")).scalar() - 1
            if engine.dialect.name == "sqlite" and last:
                connection.execute(text("DELETE FROM sqlite_sequence WHERE name = 'items'"))
                connection.execute(text("INSERT INTO sqlite_sequence (name, seq) VALUES ('items', :last)"), {"last": last})
            elif engine.dialect.name == "postgresql" and last:
                connection.execute(text("SELECT setval(pg_get_serial_sequence('items', 'id'), :last)"), {"last": last})
            connection.execute(text("ALTER TABLE manifest DROP COLUMN next_id"))
    finally:
        engine.dispose()
    meta = json.loads((directory / "index.json").read_text())
    (directory / "index.json").write_text(json.dumps({**meta, "version": 3}))


def assert_consistent(directory: Path) -> dict[str, list[int]]:
    """For both kinds: SQL ids == the ids of the committed segments less their tombstones, FAISS
    parts hold exactly their segment's ids, counts agree, and no file of another segment (nor a
    merge's staging folder) is left. It holds the index's merge lock: a background merge that
    an add started finishes first, and none starts meanwhile."""
    with merge_lock(directory, wait=True):
        return _assert_consistent(directory)


def _assert_consistent(directory: Path) -> dict[str, list[int]]:
    engine = create_engine(database_url(directory))
    try:
        with engine.connect() as db:
            n_images, n_captions, next_segment = db.execute(text("SELECT n_images, n_captions, next_segment FROM manifest")).one()
            hashes = {
                kind: dict(db.execute(text("SELECT id, hash FROM items WHERE kind=:k ORDER BY id"), {"k": kind}).all())
                for kind in ("image", "caption")
            }
            sql = {kind: list(hashes[kind]) for kind in hashes}
            dangling = db.execute(
                text(
                    "SELECT COUNT(*) FROM items c LEFT JOIN items i ON c.image_item_id = i.id "
                    "WHERE c.kind='caption' AND (i.id IS NULL OR i.kind != 'image')"
                )
            ).scalar()
            segments = db.execute(text("SELECT id, kind, rows, dead, first_id, part FROM segments")).all()
            dead: dict[int, set[int]] = {}
            for segment_id, item_id in db.execute(text("SELECT segment_id, item_id FROM tombstones")):
                dead.setdefault(segment_id, set()).add(item_id)
    finally:
        engine.dispose()
    assert dangling == 0
    assert (n_images, n_captions) == (len(sql["image"]), len(sql["caption"]))
    held: dict[str, list[int]] = {"image": [], "caption": []}
    for segment_id, kind, rows, n_dead, first_id, part in segments:
        assert segment_id < next_segment
        stem = directory / f"{'images' if kind == 'image' else 'captions'}.s{segment_id}"
        ids = np.load(f"{stem}.ids.npy")
        vectors = np.load(f"{stem}.npy", mmap_mode="r")
        assert len(ids) == len(vectors) == rows and ids[0] == first_id and (np.diff(ids) > 0).all()
        assert n_dead == len(dead.get(segment_id, ())) and dead.get(segment_id, set()) <= set(ids.tolist())
        assert Path(f"{stem}.faiss").exists() == bool(part)
        if part:
            index = faiss.read_index(f"{stem}.faiss")
            assert index.d == vectors.shape[1] and sorted(faiss_ids(index).tolist()) == ids.tolist()
        live = [i for i in ids.tolist() if i not in dead.get(segment_id, ())]
        held[kind].extend(live)
        keys = np.load(f"{stem}.hashes.npy")  # sorted keys with their ids: every live row's, maybe dead ones' too
        assert keys.shape[0] == 2 and (keys[0][1:] >= keys[0][:-1]).all() and set(keys[1].tolist()) <= set(ids.tolist())
        by_id = dict(zip(keys[1].tolist(), keys[0].tolist()))
        if live:
            want = hash_keys.keys_of([hashes[kind].get(i, "") for i in live]).tolist()
            assert [by_id.get(i) for i in live] == want, f"segment {segment_id}: hash keys disagree with SQL"
    for kind in held:
        assert sorted(held[kind]) == sql[kind], kind
    committed = {row[0] for row in segments}
    names = [p.name for p in directory.iterdir()]
    assert not [n for n in names if n.endswith(".tmp")]
    assert not [n for n in names if n.startswith(".merging-")], "a merge's staging folder is left"
    strays = [n for n in names if SEGMENT_FILE.match(n) and int(SEGMENT_FILE.match(n)[2]) not in committed]
    assert not strays, strays
    return sql
