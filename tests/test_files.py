"""Atomic writes: the target holds the old bytes or the new ones, and no temporary file is left behind."""
from __future__ import annotations

from pathlib import Path

import pytest

from indexer.files import atomic_path, write_atomic


def test_write_replaces_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "manifest.json"
    write_atomic(target, "one")
    write_atomic(target, b"two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["manifest.json"]


def test_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    write_atomic(target, b"old")
    with pytest.raises(RuntimeError, match="disk fell over"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the n")
            raise RuntimeError("disk fell over")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_each_writer_gets_its_own_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "cache.npy"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first"  # the outer block finishes last and wins
