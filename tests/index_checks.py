"""Consistency checks of an index directory, read straight from its SQLite file and FAISS files."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import faiss
import numpy as np


def faiss_ids(index: faiss.Index) -> np.ndarray:
    """Every id a FAISS index holds, whether it keeps them in an IDMap or in IVF lists."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(index.id_map)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(ivf.nlist)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def assert_consistent(directory: Path) -> dict[str, list[int]]:
    """FAISS ids == stored ids == SQL ids for both kinds at the committed generation; no orphans."""
    with sqlite3.connect(directory / "meta.sqlite") as db:
        generation, n_images, n_captions = db.execute(
            "SELECT generation, n_images, n_captions FROM manifest"
        ).fetchone()
        sql = {
            kind: [row[0] for row in db.execute("SELECT id FROM items WHERE kind=? ORDER BY id", (kind,))]
            for kind in ("image", "caption")
        }
        dangling = db.execute(
            "SELECT COUNT(*) FROM items c LEFT JOIN items i ON c.image_item_id = i.id "
            "WHERE c.kind='caption' AND (i.id IS NULL OR i.kind != 'image')"
        ).fetchone()[0]
    assert dangling == 0
    assert (n_images, n_captions) == (len(sql["image"]), len(sql["caption"]))
    for kind, name in (("image", "images"), ("caption", "captions")):
        stored = np.load(directory / f"{name}.g{generation}.ids.npy")
        vectors = np.load(directory / f"{name}.g{generation}.npy")
        index = faiss.read_index(str(directory / f"{name}.g{generation}.faiss"))
        assert sorted(stored.tolist()) == sql[kind]
        assert vectors.shape == (len(stored), index.d)
        if index.is_trained:
            assert sorted(faiss_ids(index).tolist()) == sql[kind]
        else:
            assert index.ntotal == 0
    names = [p.name for p in directory.iterdir()]
    assert not [n for n in names if n.endswith(".tmp")]
    newer = [n for n in names if n.split(".")[0] in ("images", "captions") and int(n.split(".")[1][1:]) > generation]
    assert not newer
    return sql
