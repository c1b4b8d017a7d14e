"""Ids reserved before the vectors exist (`Index.reserve_ids`), then given to `add_vectors`: a distributed job's numbering."""
from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

from conftest import ColourMeanEncoder
from index_checks import to_format_3
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


@pytest.fixture
def other_db_url(tmp_path) -> str:
    """A database seesay knows only by its SQLAlchemy URL (no SQLite or PostgreSQL specifics)."""
    registry.register("otherdb", __name__, "OtherDatabase")
    return f"otherdb:///{tmp_path / 'meta.db'}"


@pytest.fixture(params=["sqlite", "postgresql", "otherdb"])
def every_db_url(request) -> str | None:
    """SQLite (None: the default file), PostgreSQL, or another database."""
    if request.param == "otherdb":
        return request.getfixturevalue("other_db_url")
    return None if request.param == "sqlite" else request.getfixturevalue("postgres").new_database()


def test_deleting_the_newest_item_never_hands_its_id_to_the_next_add(tmp_path, every_db_url):
    path = tmp_path / "i"
    with _new_index(path, every_db_url) as index:
        assert index.add_vectors(_rows(["a", "b"]), _vectors(2)).ids == [1, 2]
        assert index.delete([2]) == 1
        assert index.add_vectors(_rows(["c"]), _vectors(1, seed=1)).ids == [3]
        assert index.delete([3]) == 1  # its id is its own: no clash with b's tombstone
        assert index.reserve_ids(2) == [4, 5]
        assert index.add_vectors(_rows(["d"]), _vectors(1, seed=2), ids=[5]).ids == [5]
    with Index.open(path, db_url=every_db_url) as index:
        assert index.add_vectors(_rows(["e"]), _vectors(1, seed=3)).ids == [6]  # reserved 4 stays unused
        assert [item.source_id for item in index.items([1, 5, 6])] == ["a", "d", "e"]
        assert index.verify(deep=True) == []


def test_given_ids_never_reserved_or_already_given_are_refused_naming_them(tmp_path, db_url):
    with _new_index(tmp_path / "i", db_url) as index:
        reserved = index.reserve_ids(5)
        index.add_vectors(_rows(["a", "b", "c", "d"]), _vectors(4), ids=reserved[:4])
        with pytest.raises(SeesayError, match=r"item ids \[6\] were never reserved from index .*; nothing added"):
            index.add_vectors(_rows(["x"]), _vectors(1, seed=1), ids=[6])
        with pytest.raises(SeesayError, match=r"item ids \[2\] of index .* are already given to other items \(or deleted ones\); nothing added"):
            index.add_vectors(_rows(["x"]), _vectors(1, seed=1), ids=[2])
        index.delete([2])  # a quarter of its segment: no merge drops the tombstone
        with pytest.raises(SeesayError, match=r"item ids \[2\] of index .* already given"):
            index.add_vectors(_rows(["x"]), _vectors(1, seed=1), ids=[2])
        assert index.add_vectors(_rows(["x"]), _vectors(1, seed=1), ids=reserved[4:]).ids == [5]
        assert index.info().n_images == 4
        assert index.verify(deep=True) == []


def test_an_id_an_older_seesay_gave_twice_is_a_one_line_error_until_compaction(tmp_path, other_db_url):
    path = tmp_path / "i"
    with _new_index(path, other_db_url) as index:
        index.add_vectors(_rows(["a", "b", "c", "d"]), _vectors(4))  # one segment: a quarter deleted starts no merge
        index.delete([4])
    engine = create_engine(other_db_url)
    with engine.begin() as connection:  # format 3 numbered adds here from the largest id stored
        connection.execute(text("UPDATE manifest SET next_id = 4"))
    engine.dispose()
    with Index.open(path, db_url=other_db_url) as index:
        assert index.add_vectors(_rows(["e"]), _vectors(1, seed=1)).ids == [4]
        with pytest.raises(SeesayError, match=r"^items \[4\] of index .*`seesay compact --index .*`, then delete again; nothing deleted$"):
            index.delete([4])
        assert [item.source_id for item in index.items([4])] == ["e"]
        index.compact(everything=True)  # drops d's vector and its tombstone
        assert index.delete([4]) == 1
        assert index.add_vectors(_rows(["f"]), _vectors(1, seed=2)).ids == [5]
        assert index.verify(deep=True) == []


def test_an_index_made_before_the_id_counter_starts_it_past_its_deleted_ids(tmp_path, other_db_url):
    path = tmp_path / "i"
    with _new_index(path, other_db_url) as index:
        index.add_vectors(_rows(["a", "b", "c", "d"]), _vectors(4))
        index.delete([4])  # the newest: only its tombstone still names its id
    to_format_3(path)
    with Index.open(path, db_url=other_db_url) as index:
        assert index.add_vectors(_rows(["e"]), _vectors(1, seed=1)).ids == [5]
        assert index.delete([5]) == 1
        assert index.verify(deep=True) == []
