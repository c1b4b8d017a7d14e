"""Format 1 → 2: the files of the committed generation become one segment per kind.

Format 1 kept, per generation G, `NAME.gG.{faiss,npy,ids.npy}` and no segments table.
The migration adds the new tables and column, hard-links (or copies) generation G's
files to segment names, records those segments in one transaction, and only then is
index.json rewritten and the old files removed; run again after a crash, it finds the
segments recorded and just finishes.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import inspect, text

from indexer import store
from indexer.store import Base, SegmentRow, Store
from indexer.vectors import build, is_flat

_GENERATION_FILE = re.compile(r"^(images|captions)\.g\d+\.(faiss|npy|ids\.npy)(\.tmp)?$")


def migrate_v1(directory: Path, db: Store, set_names: dict[str, str]) -> None:
    """Turn a format-1 index in `directory` into format 2's segments (index.json is the caller's)."""
    columns = {column["name"] for column in inspect(db.engine).get_columns("manifest")}
    if "next_segment" not in columns:
        with db.engine.begin() as connection:
            connection.execute(text("ALTER TABLE manifest ADD COLUMN next_segment INTEGER NOT NULL DEFAULT 0"))
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

