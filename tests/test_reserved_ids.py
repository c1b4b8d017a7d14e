"""Ids reserved before the vectors exist (`Index.reserve_ids`), then given to `add_vectors`: a distributed job's numbering."""
from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

from conftest import ColourMeanEncoder
from indexer import Index, NewItem
from retrieval.collection import built_by
from retrieval.errors import SeesayError


def _new_index(path, db_url) -> Index:
    encoder = ColourMeanEncoder(8)

    def save(folder):
        encoder.save(folder)
        return built_by(encoder)

    return Index.create(path, save, db_url=db_url)


def _rows(names: list[str]) -> list[NewItem]:
    return [NewItem("image", name, f"hash-{name}", path=f"/images/{name}.png") for name in names]


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)  # unit rows: each is its own nearest


def test_reserved_ids_are_never_given_to_another_add(tmp_path, db_url):
    with _new_index(tmp_path / "i", db_url) as index:
        index.add_vectors(_rows(["a"]), _vectors(1))
        reserved = index.reserve_ids(3)
        assert reserved == [2, 3, 4]
        other = index.add_vectors(_rows(["b"]), _vectors(1, seed=1))  # a writer meanwhile
        assert other.ids == [5]
        added = index.add_vectors(_rows(["c", "d", "e"]), _vectors(3, seed=2), ids=reserved)
        assert added.ids == reserved
        assert index.reserve_ids(1) == [6]
        _, found = index.search("image", _vectors(3, seed=2), 1)
        assert found[:, 0].tolist() == reserved
        assert [item.source_id for item in index.items(reserved)] == ["c", "d", "e"]
        assert index.verify(deep=True) == []


def test_given_ids_survive_reopening_and_bad_ones_are_refused(tmp_path, db_url):
    path = tmp_path / "i"
    with _new_index(path, db_url) as index:
        reserved = index.reserve_ids(2)
    with Index.open(path, db_url=db_url) as index:
        assert index.reserve_ids(1) == [reserved[-1] + 1]  # the counter moved even though nothing was inserted
        with pytest.raises(SeesayError, match="ascending"):
            index.add_vectors(_rows(["x", "y"]), _vectors(2), ids=reserved[::-1])
        with pytest.raises(SeesayError, match="2 rows came with 1 ids"):
            index.add_vectors(_rows(["x", "y"]), _vectors(2), ids=reserved[:1])
        assert index.info().n_images == 0
        again = index.add_vectors(_rows(["x"]), _vectors(1), ids=reserved[:1])
        assert again.ids == reserved[:1]
        duplicate = index.add_vectors(_rows(["x"]), _vectors(1), ids=reserved[1:])  # same hash: skipped, id unused
        assert duplicate.ids == [None] and duplicate.existing == [0]


class OtherDatabase(SQLiteDialect_pysqlite):
    """SQLite under another name: seesay takes its paths for databases other than SQLite and PostgreSQL."""

    name = "otherdb"
    supports_statement_cache = True


def test_other_databases_refuse_to_reserve_ids_rather_than_risk_giving_them_twice(tmp_path):
    registry.register("otherdb", __name__, "OtherDatabase")
    with _new_index(tmp_path / "i", f"otherdb:///{tmp_path / 'meta.db'}") as index:
        assert index.add_vectors(_rows(["a"]), _vectors(1)).ids == [1]
        with pytest.raises(SeesayError, match="reserving item ids needs SQLite or PostgreSQL, not otherdb"):
            index.reserve_ids(2)
        assert index.add_vectors(_rows(["b"]), _vectors(1, seed=1)).ids == [2]  # and adds go on as before
        assert index.verify(deep=True) == []
