"""Segments: the vectors of one kind that one commit (or one merge) wrote, immutable once committed.

Segment S of the set NAME ("images" or "captions") is, in the index directory:
  NAME.sS.npy       float32 vectors, row for row with
  NAME.sS.ids.npy   int64 item ids, ascending
  NAME.sS.faiss     the FAISS part over those rows, with the same ids: absent for Flat
                    (the vectors are the index) and before a type that needs training is trained
  NAME.sS.hashes.npy  the rows' content-hash keys, sorted, with their ids (`indexer.hash_keys`)
The database's `segments` table names the committed segments; a file of any other
segment is garbage (a crashed writer's, or a merged one's) that writers remove.
`SegmentSet` searches the committed segments of one kind as one index: each answers
its top k plus as many as it holds deleted ids (tombstones), those are dropped, and
the lists are merged by score (ties to the lower id).
"""
from __future__ import annotations

import os
import re
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import faiss
import numpy as np

from indexer import hash_keys
from indexer.errors import SeesayError
from indexer.store import SegmentRow
from indexer.vectors import VectorSet, build, is_flat, read_or_fail, training_need, tunable

# Rows a merge copies at a time (8 MiB of 512-d float32 vectors).
_BLOCK = 4096
SEGMENT_FILE = re.compile(r"^(images|captions)\.s(?P<segment>\d+)\.(npy|ids\.npy|hashes\.npy|faiss)$")


def segment_paths(directory: Path, name: str, segment_id: int) -> tuple[Path, Path, Path, Path]:
    """The (vectors, ids, FAISS part, hash keys) files of one segment."""
    stem = directory / f"{name}.s{segment_id}"
    return Path(f"{stem}.npy"), Path(f"{stem}.ids.npy"), Path(f"{stem}.faiss"), Path(f"{stem}.hashes.npy")


def make_part(factory: str, dim: int, vectors: np.ndarray, ids: np.ndarray, template: faiss.Index | None) -> faiss.Index | None:
    """The FAISS part over `vectors`: None for Flat, else `template` (an empty trained index) or a
    fresh index of a type that needs no training, filled with the vectors under their ids."""
    if template is None:
        template = build(dim, factory)
        if is_flat(template):
            return None
        if not template.is_trained:
            raise SeesayError(f"FAISS index {factory!r} is not trained yet: no part can be built")
    part = faiss.clone_index(template)
    if len(ids):
        part.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return part


def write_segment(
    directory: Path, name: str, segment_id: int, vectors: np.ndarray, ids: np.ndarray, part: faiss.Index | None, keys: np.ndarray
) -> int:
    """Write one segment's files (synced to disk) and return the bytes written; `keys` is its hash key table.

    They are invisible until the transaction that records the segment commits.
    """
    vectors_path, ids_path, part_path, keys_path = segment_paths(directory, name, segment_id)
    written = _save_array(vectors_path, np.ascontiguousarray(vectors, dtype=np.float32))
    written += _save_array(ids_path, np.ascontiguousarray(ids, dtype=np.int64))
    written += write_keys(keys_path, keys)
    if part is not None:
        written += _save_part(part, part_path)
    fsync_directory(directory)
    return written


def _save_part(part: faiss.Index, path: Path) -> int:
    """Write a segment's FAISS part, synced to disk; return its size in bytes."""
    faiss.write_index(part, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return path.stat().st_size


@dataclass
class Source:
    """A committed segment as a merge reads it: its ids, its vectors (memory-mapped), which rows live,
    and its hash key table (which may still hold the dead rows)."""

    ids: np.ndarray
    vectors: np.ndarray
    live: np.ndarray
    keys: np.ndarray
    part: Path | None = None  # its FAISS part's file, if it has one


def write_merged(directory: Path, name: str, segment_id: int, sources: Sequence[Source], template: faiss.Index | None) -> int:
    """Write the live rows of `sources` (whose ids ascend from one source to the next) as one segment,
    streamed in blocks so memory stays bounded; with `template`, a FAISS part filled from the same
    blocks, or for IVF types from the sources' parts (`merge_parts`). Returns the bytes written.
    The files are synced; nothing records them."""
    vectors_path, ids_path, part_path, keys_path = segment_paths(directory, name, segment_id)
    ids = np.concatenate([s.ids[s.live] for s in sources])
    dim = sources[0].vectors.shape[1]
    part = faiss.clone_index(template) if template is not None else None
    if part is not None and is_ivf(part) and all(s.part is not None for s in sources):
        merge_parts(part, sources)
        part, merged = None, part
    else:
        merged = None
    with open(vectors_path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (len(ids), dim)})
        for source in sources:
            for start in range(0, len(source.ids), _BLOCK):
                live = source.live[start : start + _BLOCK]
                block = source.vectors[start : start + _BLOCK]
                block = np.ascontiguousarray(block if live.all() else block[live], dtype=np.float32)
                handle.write(memoryview(block).cast("B"))
                if part is not None and len(block):
                    part.add_with_ids(block, np.ascontiguousarray(source.ids[start : start + _BLOCK][live]))
        handle.flush()
        os.fsync(handle.fileno())
        written = handle.tell()
    written += _save_array(ids_path, ids)
    written += write_keys(keys_path, hash_keys.merged((s.keys, s.ids[~s.live]) for s in sources))
    part = part if merged is None else merged
    if part is not None:
        written += _save_part(part, part_path)
    fsync_directory(directory)
    return written


def is_ivf(index: faiss.Index) -> bool:
    """Whether `index` is an inverted-file index (whose lists can be merged as they are)."""
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def merge_parts(part: faiss.Index, sources: Sequence[Source]) -> None:
    """Fill `part` (an empty trained IVF index) with the inverted lists of the sources' parts,
    less their deleted rows: their codes are moved as they are, not computed again from the
    vectors (no assignment to lists, no encoding), one source in memory at a time."""
    into = faiss.extract_index_ivf(part)
    for source in sources:
        other = faiss.read_index(str(source.part))
        if not source.live.all():
            other.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(source.ids[~source.live])))
        into.merge_from(faiss.extract_index_ivf(other), 0)
    part.ntotal = into.ntotal


def write_keys(path: Path, keys: np.ndarray) -> int:
    """Write a segment's hash key table to `path`, synced; returns the bytes written."""
    return _save_array(path, np.ascontiguousarray(keys, dtype=np.int64))


def _save_array(path: Path, array: np.ndarray) -> int:
    with open(path, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
        return handle.tell()


def fsync_directory(directory: Path) -> None:
    """Make the renames and creations in `directory` durable."""
    with suppress(OSError):  # not every platform lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_ids(directory: Path, name: str, segment_id: int) -> np.ndarray:
    """A segment's item ids."""
    return np.load(segment_paths(directory, name, segment_id)[1])


def read_keys(directory: Path, name: str, segment_id: int) -> np.ndarray:
    """A segment's hash key table, memory-mapped."""
    return np.load(segment_paths(directory, name, segment_id)[3], mmap_mode="r")


def read_vectors(directory: Path, name: str, segment_id: int) -> np.ndarray:
    """A segment's vectors, memory-mapped."""
    return np.load(segment_paths(directory, name, segment_id)[0], mmap_mode="r")


def load_segment(directory: Path, name: str, row: SegmentRow, factory: str, dim: int) -> VectorSet:
    """Read one committed segment; FileNotFoundError if a merge has removed it meanwhile."""
    vectors_path, ids_path, part_path, _ = segment_paths(directory, name, row.id)
    vectors = read_or_fail(lambda path: np.load(path, mmap_mode="r"), vectors_path)
    ids = read_or_fail(np.load, ids_path)
    if row.part:
        # Served from a memory map of the file (the OS pages lists in as searches touch them),
        # not copied into the process: parts are immutable, and a merge that retires this one
        # unlinks the file, which the map keeps alive.
        index = read_or_fail(lambda path: faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC), part_path)
    else:
        index = build(dim, factory)
        if is_flat(index) and len(ids):
            index.add_with_ids(vectors, ids)
    held = index.ntotal if index.is_trained else len(ids)
    if len(vectors) != len(ids) or held != len(ids) or len(ids) != row.rows:
        raise SeesayError(
            f"{vectors_path}: segment files disagree ({held} in FAISS, {len(vectors)} vectors, "
            f"{len(ids)} ids, {row.rows} recorded)"
        )
    return VectorSet(name, factory, index, vectors, ids)


def read_template(directory: Path, name: str, rows: Sequence[SegmentRow]) -> faiss.Index | None:
    """An empty trained index of this kind (read from its smallest part, without reading an IVF
    part's lists: after `compact` the only part may hold millions), or None if none has a part."""
    with_parts = [row for row in rows if row.part]
    if not with_parts:
        return None
    smallest = min(with_parts, key=lambda row: row.rows)
    path = str(segment_paths(directory, name, smallest.id)[2])
    template = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC)
    if is_ivf(template):  # its lists stay unread (mapped): empty ones take their place
        ivf = faiss.extract_index_ivf(template)
        empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.replace_invlists(empty, True)
        empty.this.disown()  # the index owns it now
    else:
        template = faiss.read_index(path)
    template.reset()
    return template


def segment_files(directory: Path) -> Iterable[tuple[int, Path]]:
    """(segment id, path) for every segment file in `directory`."""
    for path in directory.iterdir():
        match = SEGMENT_FILE.match(path.name)
        if match:
            yield int(match["segment"]), path


def remove_segments(directory: Path, keep: set[int] | None = None, drop: set[int] | None = None) -> None:
    """Delete segment files: those of segments not in `keep`, or those of segments in `drop`.

    With `keep`, call only under the write lock (no live writer owns the others).
    """
    for segment_id, path in segment_files(directory):
        if (keep is not None and segment_id not in keep) or (drop is not None and segment_id in drop):
            with suppress(FileNotFoundError):
                path.unlink()


@dataclass
class Loaded:
    """One loaded segment with its tombstoned ids (sorted)."""

    row: SegmentRow
    vectors: VectorSet
    dead: np.ndarray

    def live(self) -> np.ndarray:
        """Mask of the rows that are not tombstoned."""
        return ~np.isin(self.vectors.ids, self.dead) if len(self.dead) else np.ones(len(self.vectors.ids), dtype=bool)


@dataclass
class SegmentSet:
    """The committed segments of one kind, searched as one index."""

    name: str
    factory: str
    dim: int
    segments: list[Loaded] = field(default_factory=list)
    params: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(s.row.rows - len(s.dead) for s in self.segments)

    @property
    def untrained(self) -> int:
        """How many more vectors this kind needs before its index is trained (0 once trained or
        when it needs none); until then its segments are searched by exact scans."""
        fresh = build(self.dim, self.factory)
        if fresh.is_trained or any(s.vectors.index.is_trained for s in self.segments):
            return 0
        return max(0, training_need(fresh) - len(self))

    @property
    def tunable(self) -> set[str]:
        """Search parameters that apply to this set's FAISS type."""
        return tunable(self.segments[0].vectors.index if self.segments else build(self.dim, self.factory))

    def set_params(self, params: Mapping[str, int]) -> None:
        self.params = dict(params)
        for segment in self.segments:
            segment.vectors.set_params(self.params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), each (nq, k), over every live item; missing hits have id -1 and score -inf."""
        nq = len(queries)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        if not len(self) or not nq:
            return scores, ids
        found_scores, found_ids = [], []
        for segment in self.segments:
            live = segment.row.rows - len(segment.dead)
            if not live:
                continue
            s, i = segment.vectors.search(queries, min(k + len(segment.dead), segment.row.rows))
            if len(segment.dead):
                gone = np.isin(i, segment.dead)
                s, i = np.where(gone, -np.inf, s), np.where(gone, -1, i)
            found_scores.append(s)
            found_ids.append(i)
        all_scores, all_ids = np.concatenate(found_scores, axis=1), np.concatenate(found_ids, axis=1)
        if len(found_scores) == 1 and all_scores.shape[1] == k and not len(self.segments[0].dead):
            return all_scores, all_ids
        # Best score first, ties to the lower id; misses (id -1) last.
        order = np.lexsort((np.where(all_ids < 0, np.iinfo(np.int64).max, all_ids), -all_scores), axis=1)[:, :k]
        kk = order.shape[1]
        scores[:, :kk] = np.take_along_axis(all_scores, order, axis=1)
        ids[:, :kk] = np.take_along_axis(all_ids, order, axis=1)
        return scores, ids

    def lookup(self, wanted: Sequence[int]) -> np.ndarray:
        """Stored vectors for live ids, in order; an error names the ids not here."""
        wanted = np.asarray(wanted, dtype=np.int64).reshape(-1)
        out = np.zeros((len(wanted), self.dim), dtype=np.float32)
        found = np.zeros(len(wanted), dtype=bool)
        for segment in self.segments:
            hit = np.isin(wanted, segment.vectors.ids) & ~np.isin(wanted, segment.dead)
            if hit.any():
                out[hit] = segment.vectors.lookup(wanted[hit])
                found |= hit
        if not found.all():
            raise SeesayError(f"no {self.name} vectors for ids {wanted[~found].tolist()}")
        return out

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live (ids, vectors), in search order."""
        ids = [s.vectors.ids[s.live()] for s in self.segments]
        vectors = [np.asarray(s.vectors.vectors)[s.live()] for s in self.segments]
        if not ids:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(ids), np.concatenate(vectors)
