"""Content-hash look-ups without a database index: each segment's sorted table of 64-bit hash keys.

A unique (kind, hash) index in the database takes content hashes (sha256: random) at random
places, so once it outgrows a commit every row of a commit dirties a page of its own, written
to the log and again to the database (6× the vectors' bytes at 1M items on SQLite). Instead
each segment carries a key table, written once with its vectors and merged with them
(an LSM tree whose runs are the segments): a (2, n) int64 array, row 0 the keys (the first
8 bytes of the hash string's BLAKE2b digest) ascending, row 1 the item ids in the same order.

A look-up binary-searches every segment's keys; a key that matches names a candidate only,
which the caller confirms against the row's stored hash by primary key. So two hashes that
share a key, and items deleted since their segment was written (their keys stay until a
merge drops them), never give a false match.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np


def keys_of(hashes: Sequence[str]) -> np.ndarray:
    """The int64 key of each hash string."""
    digests = b"".join(hashlib.blake2b(h.encode("utf-8", "surrogatepass"), digest_size=8).digest() for h in hashes)
    return np.frombuffer(digests, dtype="<i8").astype(np.int64, copy=False)


def table(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The key table of items `ids` with `keys`: (2, n) int64, sorted by key (ties by id)."""
    keys, ids = np.asarray(keys, dtype=np.int64), np.asarray(ids, dtype=np.int64)
    order = np.lexsort((ids, keys))
    return np.stack([keys[order], ids[order]])


def merged(tables: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """One key table from (table, ids to drop) pairs: their rows less the dropped ids."""
    kept = []
    for rows, drop in tables:
        rows = np.asarray(rows)
        kept.append(rows[:, ~np.isin(rows[1], drop)] if len(drop) else rows)
    joined = np.concatenate(kept, axis=1) if kept else np.zeros((2, 0), dtype=np.int64)
    return table(joined[0], joined[1])


def candidates(tables: Iterable[np.ndarray], keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in `keys`, item id) of every row of `tables` whose key is among `keys`."""
    keys = np.asarray(keys, dtype=np.int64)
    positions, ids = [], []
    for rows in tables:
        if not rows.shape[1]:
            continue
        first = np.searchsorted(rows[0], keys, side="left")
        last = np.searchsorted(rows[0], keys, side="right")
        counts = last - first
        hit = np.flatnonzero(counts)
        if not len(hit):
            continue
        # Usually one row per matching key; a key shared by several rows gives each of them.
        positions.append(np.repeat(hit, counts[hit]))
        starts = np.repeat(first[hit] - np.cumsum(counts[hit]) + counts[hit], counts[hit])
        ids.append(np.asarray(rows[1])[starts + np.arange(int(counts[hit].sum()))])
    if not ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(positions), np.concatenate(ids)
