"""seesay's exact search returns FAISS flat's top-k (ties aside), whichever path it takes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path as FilePath

import faiss
import numpy as np
import pytest

from indexer.exact_search import METHODS, ExactSearch, blocked_topk
from indexer.path_choice import RECHECK_CALLS, SAMPLES, Path, PathTable, forget_tables, machine_key, table_for


@pytest.fixture(autouse=True)
def _fresh_tables():
    """Each test starts with no path timings from the others."""
    forget_tables()
    yield
    forget_tables()


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _faiss_flat(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index.search(q, k)


def _same_topk(ours: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> None:
    scores, ids = ours
    ref_scores, ref_ids = ref
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
    # Ids agree except where neighbouring scores tie within float rounding.
    differ = ids != ref_ids
    if differ.any():
        gaps = np.abs(np.diff(ref_scores, axis=1))
        near_tie = np.zeros_like(differ)
        near_tie[:, 1:] |= gaps < 1e-5
        near_tie[:, :-1] |= gaps < 1e-5
        assert not (differ & ~near_tie).any()


@pytest.mark.parametrize("nq", [1, 7, 16, 64, 300])
@pytest.mark.parametrize("score_bytes", [1 << 12, 1 << 16, 1 << 24])
def test_blocked_matches_faiss_flat(nq: int, score_bytes: int) -> None:
    rng = np.random.default_rng(nq)
    x = _unit(rng, 5003, 64)
    q = _unit(rng, nq, 64)
    ours = blocked_topk(np.ascontiguousarray(x.T), q, 10, score_bytes=score_bytes)
    _same_topk(ours, _faiss_flat(x, q, 10))
    with_rows = blocked_topk(np.ascontiguousarray(x.T), q, 10, score_bytes=score_bytes, vectors=x)
    _same_topk(with_rows, _faiss_flat(x, q, 10))


@pytest.mark.parametrize("method", METHODS)
def test_exact_search_maps_ids_and_pads(method: str) -> None:
    rng = np.random.default_rng(1)
    x = _unit(rng, 6, 16)
    ids = np.arange(100, 106, dtype=np.int64)
    search = ExactSearch(x, ids)
    scores, found = search.search(x[:3], 8, method)
    assert found.shape == (3, 8)
    assert (found[:, 0] == ids[:3]).all()  # each vector is its own best match
    assert (found[:, 6:] == -1).all() and np.isneginf(scores[:, 6:]).all()
    assert set(found[0, :6]) == set(ids)


def test_duplicate_scores_and_small_k() -> None:
    rng = np.random.default_rng(3)
    base = _unit(rng, 50, 8)
    x = np.repeat(base, 40, axis=0)  # every score appears 40 times
    q = _unit(rng, 5, 8)
    scores, ids = blocked_topk(np.ascontiguousarray(x.T), q, 3, score_bytes=1 << 10)
    ref_scores, _ = _faiss_flat(x, q, 3)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    np.testing.assert_allclose(np.einsum("qd,qkd->qk", q, x[ids]), scores, atol=1e-5)


def test_flat_vector_set_searches_exactly_after_adds_and_removes(monkeypatch) -> None:
    """A Flat VectorSet answers through ExactSearch; after a removal it sees the new contents."""
    from indexer.vectors import VectorSet

    served: list[int] = []
    exact_search = ExactSearch.search
    monkeypatch.setattr(ExactSearch, "search", lambda self, q, *args, **kw: served.append(len(q)) or exact_search(self, q, *args, **kw))
    rng = np.random.default_rng(4)
    x = _unit(rng, 3000, 32)
    ids = np.arange(10, 3010, dtype=np.int64)
    vs = VectorSet.empty("image", 32, "Flat")
    vs.add(x, ids)
    for nq in (1, 16, 1500):
        q = _unit(rng, nq, 32)
        ref_scores, pos = _faiss_flat(x, q, 10)
        _same_topk(vs.search(q, 10), (ref_scores, ids[pos]))
    assert served == [1, 16, 1500]  # the exact path served those searches
    gone = ids[:1500]
    vs.remove(gone.tolist())
    q = x[:5]  # each removed vector's best match is now someone else
    _, found = vs.search(q, 10)
    assert not np.isin(found, gone).any()
    ref_scores, pos = _faiss_flat(x[1500:], q, 10)
    _same_topk(vs.search(q, 10), (ref_scores, ids[1500:][pos]))


@pytest.mark.parametrize("nq", [1, 5, 16, 64])
@pytest.mark.parametrize("data", ["uniform", "clustered", "scaled"])
def test_screened_matches_faiss_flat(nq: int, data: str) -> None:
    from indexer.exact_search import screened_topk

    rng = np.random.default_rng(10 + nq)
    x = _unit(rng, 6007, 96)
    if data == "clustered":  # many close scores: the screen must keep every contender
        x = _unit(rng, 30, 96)[rng.integers(0, 30, 6007)] + 0.05 * rng.standard_normal((6007, 96), dtype=np.float32)
    if data == "scaled":  # norms far from 1: the bound scales with them
        x = x * rng.uniform(0.1, 30, (6007, 1)).astype(np.float32)
    q = _unit(rng, nq, 96) * 3
    search = ExactSearch(x)
    found = screened_topk(search.vectors, search.codes, q, 10, score_bytes=1 << 14)
    assert found is not None
    ref = _faiss_flat(x, q, 10)
    np.testing.assert_allclose(found[0], ref[0], rtol=1e-5, atol=1e-4)
    _same_topk((found[0], found[1]), (found[0], ref[1]))  # ids agree up to ties


def test_screened_falls_back_on_a_corpus_of_duplicates() -> None:
    from indexer.exact_search import screened_topk

    rng = np.random.default_rng(4)
    x = np.repeat(_unit(rng, 3, 16), 2000, axis=0)  # every score ties with 1,999 others
    q = _unit(rng, 4, 16)
    search = ExactSearch(x)
    assert screened_topk(search.vectors, search.codes, q, 5) is None
    scores, ids = search.search(q, 5, "screened")  # the blocked path answers instead
    np.testing.assert_allclose(scores, _faiss_flat(x, q, 5)[0], atol=1e-5)


@pytest.mark.parametrize("data", ["uniform", "scaled", "sparse"])
def test_screen_scores_stay_within_the_proven_margin(data: str) -> None:
    """Every int8 screen score lies within `query_codes`' margin of the exact inner product."""
    from indexer.exact_search import int8_codes, query_codes

    rng = np.random.default_rng(7)
    x = _unit(rng, 2000, 64)
    if data == "scaled":
        x = x * rng.uniform(0.01, 50, (2000, 1)).astype(np.float32)
    if data == "sparse":  # a few large coordinates: a coarse common scale
        x[:, :3] *= 40
    q = np.concatenate([_unit(rng, 20, 64) * 7, np.zeros((1, 64), dtype=np.float32)])
    screen = int8_codes(x)
    codes, scale, margin = query_codes(q, screen)
    approx = scale[:, None] * screen.scale * (codes.astype(np.int64) @ screen.codes.numpy().astype(np.int64).T)
    exact = q.astype(np.float64) @ x.astype(np.float64).T
    assert (np.abs(exact - approx) <= margin[:, None]).all()
    assert margin[-1] < 1e-5 * screen.max_norm and (approx[-1] == 0).all()  # a zero query: float slack only


def test_screened_search_is_exact_among_near_duplicates() -> None:
    """Clusters of near-copies: the screen may hand over to the blocked path, but the answer is exact."""
    rng = np.random.default_rng(8)
    x = _unit(rng, 30, 96)[rng.integers(0, 30, 6007)] + 0.01 * rng.standard_normal((6007, 96), dtype=np.float32)
    q = _unit(rng, 16, 96)
    _same_topk(ExactSearch(x).search(q, 10, "screened"), _faiss_flat(x, q, 10))


def test_single_queries_build_the_screen_only_once_it_pays() -> None:
    """One-off single queries scan without the int8 codes; steady use builds them; a batch may try them at once."""
    import indexer.exact_search as exact_search

    rng = np.random.default_rng(9)
    x = _unit(rng, 4000, 32)
    search = ExactSearch(x)
    q = _unit(rng, 1, 32)
    assert "screened" not in {p.method for p in search.paths(1)}
    assert search.table(1, 5).next_path(search.paths(1)) == Path("blocked")  # what a one-off query runs
    search.search(q, 5)
    assert "codes" not in search.__dict__
    for _ in range(exact_search.CODES_BUILD_SCANS):
        _same_topk(search.search(q, 5), _faiss_flat(x, q, 5))
    assert "screened" in {p.method for p in search.paths(1)}
    for _ in range(2 * len(search.paths(1))):  # the screen is timed like the others
        _same_topk(search.search(q, 5), _faiss_flat(x, q, 5))
    assert "codes" in search.__dict__ and search.path_for(1, 5) is not None
    assert "screened" in {p.method for p in ExactSearch(x).paths(2)}


def test_every_path_gives_the_same_answer() -> None:
    """Same scores to the bit, same ids, same order, ties included (each vector is stored three times)."""
    rng = np.random.default_rng(11)
    x = np.repeat(_unit(rng, 2000, 48), 3, axis=0)
    ids = rng.permutation(np.arange(7, 7 + len(x), dtype=np.int64))
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(48))
    flat.add_with_ids(x, ids)
    for search in (ExactSearch(x, ids), ExactSearch(x, ids, flat=flat)):
        for nq in (1, 16, 300):
            q = _unit(rng, nq, 48)
            answers = [search.search(q, 10, path) for path in search.paths(nq) + [Path(m, serial=True) for m in METHODS]]
            np.testing.assert_allclose(answers[0][0], _faiss_flat(x, q, 10)[0], atol=1e-5)
            where = np.argsort(ids)[np.searchsorted(np.sort(ids), answers[0][1])]
            np.testing.assert_allclose(np.einsum("qd,qkd->qk", q, x[where]), answers[0][0], atol=1e-5)
            for scores, found in answers[1:]:
                assert np.array_equal(scores, answers[0][0]) and np.array_equal(found, answers[0][1])
            top = answers[0][1][:, :3]  # the three copies of the best vector, smallest id first
            assert (np.diff(top, axis=1) > 0).all()


def test_the_choice_follows_the_timings() -> None:
    """Injected timings: each path is tried SAMPLES times, a path PRUNE× slower once, then the fastest serves."""
    a, b, c = Path("blocked"), Path("screened"), Path("faiss", serial=True)
    table = PathTable()
    seconds = {a: 1.0, b: 3.0, c: 0.5}
    order = []
    while not table.settled([a, b, c]):
        path = table.next_path([a, b, c])
        order.append(path)
        table.record(path, seconds[path])
    assert order == [a, a, b, c, c]  # b's first time is 3× the best: not timed again
    assert table.best([a, b, c]) == c and table.next_path([a, b, c]) == c
    assert table.next_path([a, b]) == a  # c unavailable (e.g. no codes yet): the best of the rest
    for _ in range(SAMPLES):  # c turns slow on the calls it serves: it gives way to a
        table.record(c, 2.0)
    assert table.next_path([a, b, c]) == a
    table.record(a, 1.0)
    table.record(c, 0.5)  # and c is back: it gets the next call once a's recent best is worse
    assert table.next_path([a, b, c]) == c
    seconds[a] = 0.1  # the load changed: the runner-up is re-timed every RECHECK_CALLS calls
    served = []
    for _ in range(RECHECK_CALLS + 2):
        path = table.next_path([a, b, c])
        served.append(path)
        table.record(path, seconds[path])
    first = served.index(a)  # c keeps serving until the recheck, then a (now faster) does
    assert RECHECK_CALLS - 5 <= first < RECHECK_CALLS and set(served[first:]) == {a} and table.next_path([a, b, c]) == a


def test_search_serves_the_measured_fastest_path(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(12)
    x = _unit(rng, 3000, 32)
    search = ExactSearch(x)
    table = search.table(16, 10)
    for path in search.paths(16):  # as if FAISS on all threads had been timed fastest
        for _ in range(SAMPLES):
            table.record(path, 1e-6 if path == Path("faiss") else 1.0)
    ran = []
    for method in METHODS:
        original = getattr(ExactSearch, f"_{method}")
        monkeypatch.setattr(ExactSearch, f"_{method}", lambda self, q, k, m=method, f=original: ran.append(m) or f(self, q, k))
    q = _unit(rng, 16, 32)
    _same_topk(search.search(q, 10), _faiss_flat(x, q, 10))
    assert ran == ["faiss"] and search.path_for(16) == Path("faiss")


def test_a_large_batch_times_the_paths_on_slices_of_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    import indexer.exact_search as exact_search

    monkeypatch.setattr(exact_search, "EXPLORE_FROM", 64)
    monkeypatch.setattr(exact_search, "EXPLORE_MIN_SLICE", 8)
    rng = np.random.default_rng(13)
    x = _unit(rng, 4000, 32)
    search = ExactSearch(x)
    q = _unit(rng, 256, 32)
    _same_topk(search.search(q, 10), _faiss_flat(x, q, 10))
    assert search.path_for(256) is not None  # one batch timed every path
    _same_topk(search.search(q, 10), _faiss_flat(x, q, 10))


def test_a_change_of_thread_count_starts_a_new_table() -> None:
    import torch

    search = ExactSearch(_unit(np.random.default_rng(14), 500, 16))
    table = search.table(16, 10)
    assert search.table(16, 10) is table and search.table(17, 10) is table and search.table(32, 10) is not table
    before, key = torch.get_num_threads(), machine_key()
    try:
        torch.set_num_threads(before + 1)
        assert machine_key() != key
        assert search.table(16, 10) is not table
    finally:
        torch.set_num_threads(before)
    assert search.table(16, 10) is table
    assert table_for((1,), machine=("cpu A",)) is not table_for((1,), machine=("cpu B",))


def test_a_new_batch_size_first_tries_what_won_at_the_nearest() -> None:
    rng = np.random.default_rng(15)
    x = _unit(rng, 2000, 16)
    search = ExactSearch(x)
    table = search.table(16, 10)
    for path in search.paths(16):
        for _ in range(SAMPLES):
            table.record(path, 1e-6 if path == Path("faiss", serial=True) else 1.0)
    q = _unit(rng, 40, 16)
    _same_topk(search.search(q, 10), _faiss_flat(x, q, 10))
    assert search.table(40, 10).summary().keys() == {"faiss/1"}  # the first path timed at 32-63 queries


def test_serial_searches_in_parallel_threads_restore_the_thread_counts() -> None:
    """The server searches from several threads: one-thread paths must not leave torch on one thread."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    rng = np.random.default_rng(16)
    x = _unit(rng, 3000, 32)
    q = _unit(rng, 8, 32)
    search = ExactSearch(x)
    before, key = torch.get_num_threads(), machine_key()
    ref = _faiss_flat(x, q, 10)
    paths = [Path(m, serial=True) for m in METHODS] + [Path(m) for m in METHODS]
    with ThreadPoolExecutor(4) as pool:
        for found in pool.map(lambda i: search.search(q, 10, paths[i % len(paths)]), range(24)):
            _same_topk(found, ref)
    assert torch.get_num_threads() == before and machine_key() == key



RACE_SCRIPT = """
import sys, threading
from indexer.path_choice import Path, machine_key, parallel_threads, threads_for
assert "torch" not in sys.modules
importer = threading.Thread(target=lambda: __import__("torch"))
importer.start()
while "torch" not in sys.modules:
    pass
reads = 0
while importer.is_alive():  # torch is half-imported meanwhile
    machine_key(), parallel_threads()
    with threads_for(Path("faiss", serial=True)):
        pass
    reads += 1
import torch
assert machine_key()[2] == torch.get_num_threads() > 0, machine_key()
print(reads)
"""


def test_thread_settings_read_while_another_thread_imports_torch() -> None:
    """A server's first request can import torch while other requests search: the half-imported
    module Python lists meanwhile must read as 'torch not loaded', not fail the search."""
    root = FilePath(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", RACE_SCRIPT], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.strip()) > 0  # searches ran during the import
