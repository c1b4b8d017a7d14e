"""Migrations of older index formats, run by the first writable open; index.json is rewritten after them.

Format 1 → 2: the files of the committed generation become one segment per kind.
Format 1 kept, per generation G, `NAME.gG.{faiss,npy,ids.npy}` and no segments table.
The migration adds the new tables and column, hard-links (or copies) generation G's
files to segment names, records those segments in one transaction, and only then is
index.json rewritten and the old files removed; run again after a crash, it finds the
segments recorded and just finishes.

Format 2 → 3: every committed segment gets its hash key table (`indexer.hash_keys`), built
from the rows' stored hashes, and the database loses its unique (kind, hash) index. Both
steps can be run again after a crash: the tables are rewritten from the database, and the
index is dropped in one transaction if it is still there.

Format 3 → 4: item ids come from the manifest's `next_id` counter on every database, not
from the database's own (which only SQLite's AUTOINCREMENT and PostgreSQL's sequence keep
past deleted ids). The column is added with 0 ("not set"), then set under the write lock
past every id the database may have given; run again after a crash, it finds it set and
leaves it, so ids given meanwhile by a migrated writer are never given again.
"""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.schema import CreateIndex, CreateTable

from indexer import hash_keys, store
from indexer.errors import SeesayError
from indexer.segments import fsync_directory, read_ids, segment_paths, write_keys
from indexer.store import Base, ItemRow, SegmentRow, Store
from indexer.vectors import build, is_flat

_GENERATION_FILE = re.compile(r"^(images|captions)\.g\d+\.(faiss|npy|ids\.npy)(\.tmp)?$")


# Manifest columns later formats added, with what an older row gets: 0 means "set by its migration".
_ADDED_COLUMNS = {"next_segment": "INTEGER NOT NULL DEFAULT 0", "next_id": "INTEGER NOT NULL DEFAULT 0"}


def add_manifest_columns(db: Store) -> None:
    """Add the manifest columns an older index lacks (each in its own committed statement; any
    still missing after a crash is added by the next open, and one another process added meanwhile is kept)."""
    for name, kind in _ADDED_COLUMNS.items():
        if name in _manifest_columns(db):
            continue
        try:
            with db.engine.begin() as connection:
                connection.execute(text(f"ALTER TABLE manifest ADD COLUMN {name} {kind}"))
        except SQLAlchemyError:
            if name not in _manifest_columns(db):  # not a concurrent migration's doing
                raise


def _manifest_columns(db: Store) -> set[str]:
    return {column["name"] for column in inspect(db.engine).get_columns("manifest")}


def migrate_v3(db: Store) -> None:
    """Start the manifest's id counter (`add_manifest_columns` made it, at 0) past every id the database may have given."""
    with db.writing() as (session, manifest):
        if not manifest.next_id:
            manifest.next_id = store.first_unused_id(session)


def migrate_v1(directory: Path, db: Store, set_names: dict[str, str]) -> None:
    """Turn a format-1 index in `directory` into format 2's segments (index.json is the caller's)."""
    Base.metadata.create_all(db.engine)
    with db.writing() as (session, manifest):
        if not store.list_segments(session) and manifest.next_segment == 0:
            flat = is_flat(build(manifest.dim, manifest.factory))
            for segment_id, (kind, name) in enumerate(set_names.items()):
                old = directory / f"{name}.g{manifest.generation}"
                ids = np.load(f"{old}.ids.npy")
                if not len(ids):
                    continue
                order = np.argsort(ids, kind="stable")
                if (order != np.arange(len(ids))).any():  # segments keep ids ascending
                    vectors = np.load(f"{old}.npy")[order]
                    np.save(directory / f"{name}.s{segment_id}.npy", vectors)
                    np.save(directory / f"{name}.s{segment_id}.ids.npy", ids[order])
                else:
                    _link(Path(f"{old}.npy"), directory / f"{name}.s{segment_id}.npy")
                    _link(Path(f"{old}.ids.npy"), directory / f"{name}.s{segment_id}.ids.npy")
                part = not flat and _trained(Path(f"{old}.faiss"))
                if part:
                    _link(Path(f"{old}.faiss"), directory / f"{name}.s{segment_id}.faiss")
                session.add(SegmentRow(id=segment_id, kind=kind, rows=len(ids), dead=0, first_id=int(ids.min()), part=part))
            manifest.next_segment = len(set_names)
            manifest.generation += 1
    for path in directory.iterdir():
        if _GENERATION_FILE.match(path.name):
            path.unlink()


def _trained(path: Path) -> bool:
    return faiss.read_index(str(path)).is_trained


def _link(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)



def migrate_v2(directory: Path, db: Store, set_names: dict[str, str]) -> None:
    """Turn a format-2 index in `directory` into format 3: key tables, no unique (kind, hash) index."""
    with db.writing() as (session, _manifest):
        for row in store.list_segments(session):
            name = set_names[row.kind]
            ids = read_ids(directory, name, row.id)
            stored = store.hashes_by_id(session, row.kind, ids.tolist())  # deleted rows have none: their keys are not needed
            present = [int(i) for i in ids if int(i) in stored]
            keys = hash_keys.table(hash_keys.keys_of([stored[i] for i in present]), np.array(present, dtype=np.int64))
            write_keys(segment_paths(directory, name, row.id)[3], keys)
    fsync_directory(directory)
    unique = [c["name"] for c in inspect(db.engine).get_unique_constraints("items") if sorted(c["column_names"]) == ["hash", "kind"]]
    if not unique:
        return
    if db.engine.dialect.name == "sqlite":
        _rebuild_sqlite_items(db)
        return
    with db.engine.begin() as connection:
        for constraint in unique:
            connection.execute(text(f'ALTER TABLE items DROP CONSTRAINT IF EXISTS "{constraint}"'))


def _rebuild_sqlite_items(db: Store) -> None:
    """Rebuild SQLite's items table in today's schema, in one transaction (SQLite cannot drop a
    table's UNIQUE constraint): the old table is renamed, the new one made and filled, the old one
    dropped, and the AUTOINCREMENT counter carried over, so no id is ever given twice."""
    dialect = db.engine.dialect
    table = ItemRow.__table__
    columns = ", ".join(column.name for column in table.columns)
    connection = sqlite3.connect(db.engine.url.database, isolation_level=None, timeout=store.SQLITE_BUSY_TIMEOUT_S)
    try:
        connection.execute("PRAGMA foreign_keys=OFF")  # the rows move as they are; only outside a transaction
        connection.execute("BEGIN IMMEDIATE")
        try:
            if not connection.execute("SELECT 1 FROM sqlite_master WHERE type='index' AND tbl_name='items' AND name GLOB 'sqlite_autoindex_*'").fetchone():
                connection.execute("ROLLBACK")  # another process finished it meanwhile
                return
            counter = connection.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
            for (index_name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='items' AND sql IS NOT NULL").fetchall():
                connection.execute(f'DROP INDEX "{index_name}"')
            connection.execute("ALTER TABLE items RENAME TO items_v2")
            connection.execute(str(CreateTable(table).compile(dialect=dialect)))
            for index in table.indexes:
                connection.execute(str(CreateIndex(index).compile(dialect=dialect, compile_kwargs={"literal_binds": True})))
            connection.execute(f"INSERT INTO items ({columns}) SELECT {columns} FROM items_v2")
            connection.execute("DROP TABLE items_v2")
            connection.execute("DELETE FROM sqlite_sequence WHERE name = 'items'")
            last = counter[0] if counter else 0
            connection.execute("INSERT INTO sqlite_sequence (name, seq) SELECT 'items', max(?, coalesce(max(id), 0)) FROM items", (last,))
            if connection.execute("PRAGMA foreign_key_check(items)").fetchone():
                raise SeesayError(f"{db.display_url}: items point at missing images; the migration changed nothing")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    finally:
        connection.close()
