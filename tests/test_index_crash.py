"""kill -9 at random points of an add and of a merge: the index reopens at its last committed state,
and rerunning the add ends with exactly the expected items. Flat indexes (vectors only) and IVF ones,
whose adds train the index once and whose merges move FAISS inverted lists between part files."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from index_checks import assert_consistent
from indexer import Index, NewItem
from indexer.items import BuiltBy

DIM = 32
ITEMS, COMMIT = 2_000, 100  # 20 commits: the size-tiered policy merges during the add too
MERGED = 1_200  # items of the indexes whose merge is killed
IVF = "IVF4,Flat"  # trained by the first commit; searches probe every list, so results are exact
REPO = Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [sys.argv[1], str(__import__("pathlib").Path(sys.argv[1]).parent)]  # tests, then the repository
    from test_index_crash import work
    work(sys.argv[2], sys.argv[3], int(sys.argv[4]), ready=lambda: print("ready", flush=True))
    """
)


def work(directory: str | Path, action: str, items: int = ITEMS, ready=lambda: None) -> None:
    """Add `items` images with a caption each, COMMIT at a time (deterministic), or merge everything."""
    with Index.open(directory) as index:
        ready()
        if action == "compact":
            index.compact(everything=True)
            return
        vectors = np.random.default_rng(0).standard_normal((items, DIM)).astype(np.float32)
        for start in range(0, items, COMMIT):
            span = range(start, min(start + COMMIT, items))
            rows = [NewItem("image", f"img{i}", f"h{i}") for i in span]
            rows += [NewItem("caption", f"img{i}", f"c{i}", text=f"{i}", image_hash=f"h{i}") for i in span]
            index.add_vectors(rows, np.concatenate([vectors[span.start : span.stop]] * 2))


def artefact(folder: Path) -> BuiltBy:
    folder.mkdir(parents=True, exist_ok=True)
    return BuiltBy("test-random", "test-random#0", 1, DIM)


def timed_work(directory: Path, action: str) -> float:
    """`work` here, to the end; returns how long it took."""
    started = time.monotonic()
    work(directory, action)
    return time.monotonic() - started


def killed_work(directory: Path, action: str, kill_after: float) -> None:
    """`work` in another process, killed with SIGKILL `kill_after` seconds after it has opened the index."""
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(Path(__file__).parent), str(directory), action, str(ITEMS)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert worker.stdout.readline().strip() == "ready", worker.stderr.read()
    try:
        worker.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        worker.send_signal(signal.SIGKILL)
        worker.wait()


def reopens_consistent(directory: Path) -> dict[str, list[int]]:
    """A reader sees only committed items; a writable open clears the rest; then all agrees."""
    with Index.open(directory, read_only=True) as reader:
        info = reader.info()
        _, ids = reader.search("image", np.ones((1, DIM), dtype=np.float32), ITEMS)
        assert (ids[0] >= 0).sum() == info.n_images
        assert len(reader.items([i for i in ids[0] if i >= 0])) == info.n_images
    Index.open(directory).close()
    return assert_consistent(directory)


def kill_during_adds(tmp_path: Path, new_db_url, kills: int, factory: str = "Flat") -> None:
    rng = np.random.default_rng(7)
    calibration = tmp_path / "whole"
    Index.create(calibration, artefact, factory=factory, db_url=new_db_url()).close()
    duration = timed_work(calibration, "add")  # to know where in an add to kill it
    for trial in range(kills):
        directory = tmp_path / f"idx{trial}"
        Index.create(directory, artefact, factory=factory, db_url=new_db_url()).close()
        killed_work(directory, "add", kill_after=float(rng.uniform(0, duration)))
        sql = reopens_consistent(directory)
        assert len(sql["image"]) % COMMIT == 0 and len(sql["caption"]) == len(sql["image"])  # whole commits only
        work(directory, "add")
        sql = reopens_consistent(directory)
        assert (len(sql["image"]), len(sql["caption"])) == (ITEMS, ITEMS)
        with Index.open(directory, read_only=True) as index:
            assert sorted(item.source_id for item in index.items(sql["image"])) == sorted(f"img{i}" for i in range(ITEMS))


def kill_during_merges(tmp_path: Path, new_db_url, kills: int, factory: str = "Flat") -> None:
    rng = np.random.default_rng(8)
    queries = rng.standard_normal((5, DIM)).astype(np.float32)
    duration = None
    for trial in range(kills + 1):
        directory = tmp_path / f"idx{trial}"
        Index.create(directory, artefact, factory=factory, db_url=new_db_url()).close()
        work(directory, "add", items=MERGED)  # a segment per kind per commit, below the policy's fan-out
        with Index.open(directory) as index:
            ids = assert_consistent(directory)["image"]
            parts = [name for name in index.info().files if name.endswith(".faiss")]
            assert len(parts) > 2 if factory != "Flat" else not parts  # an IVF merge moves lists between part files
            index.delete(ids[::7])
            before = reopens_consistent(directory)
            expected = index.search("caption", queries, 10)[1]
        if duration is None:  # the first merge is timed, to know where to kill the others
            duration = timed_work(directory, "compact")
            continue
        killed_work(directory, "compact", kill_after=float(rng.uniform(0, duration)))
        assert reopens_consistent(directory) == before
        with Index.open(directory) as index:
            np.testing.assert_array_equal(index.search("caption", queries, 10)[1], expected)
            index.compact(everything=True)
            assert index.info().segments == {"image": 1, "caption": 1}
        assert assert_consistent(directory) == before


def test_kill_during_add(tmp_path: Path, new_db_url) -> None:
    kill_during_adds(tmp_path, new_db_url, 2)


def test_kill_during_merge(tmp_path: Path, new_db_url) -> None:
    kill_during_merges(tmp_path, new_db_url, 2)


@pytest.mark.slow
def test_kill_during_add_20_times(tmp_path: Path, new_db_url) -> None:
    kill_during_adds(tmp_path, new_db_url, 20)


@pytest.mark.slow
def test_kill_during_merge_20_times(tmp_path: Path, new_db_url) -> None:
    kill_during_merges(tmp_path, new_db_url, 20)


@pytest.mark.slow  # 40-100 s with two kills on a loaded machine: IVF runs only in the slow set
def test_kill_during_ivf_add_20_times(tmp_path: Path, new_db_url) -> None:
    kill_during_adds(tmp_path, new_db_url, 20, IVF)


@pytest.mark.slow
def test_kill_during_ivf_merge_20_times(tmp_path: Path, new_db_url) -> None:
    kill_during_merges(tmp_path, new_db_url, 20, IVF)
