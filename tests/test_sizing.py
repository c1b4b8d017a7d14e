"""The factory chosen from a collection's size and a memory budget (autofaiss's rule)."""
from __future__ import annotations

import faiss
import pytest

from indexer.errors import SeesayError
from indexer.sizing import choose_factory, lists_for, memory_of, parse_memory


def test_parse_memory() -> None:
    assert parse_memory("4G") == 4 * 2**30 and parse_memory("512m") == 512 * 2**20 and parse_memory("1.5GB") == int(1.5 * 2**30)
    assert parse_memory("1000") == 1000
    with pytest.raises(SeesayError, match="'lots'"):
        parse_memory("lots")


def test_the_finest_codes_that_fit() -> None:
    assert choose_factory(5_000, 512, 2**30) == "Flat"
    assert lists_for(100_000) == 1024 and lists_for(1_000_000) == 2**16
    assert choose_factory(100_000, 512, 2**30) == "IVF1024,Flat"  # 205 MB of float32 codes fit
    assert choose_factory(1_000_000, 512, 2**30) == "IVF16384,SQ8"  # float32 codes would take 2 GB
    assert choose_factory(1_000_000, 512, 100 * 2**20) == "IVF16384,PQ32"  # PQ64 codes + centroids: 106 MB; 48 does not divide 512
    for n, memory in ((100_000, 2**30), (1_000_000, 2**30), (1_000_000, 100 * 2**20), (10_000_000, 2**30)):
        factory = choose_factory(n, 512, memory)
        lists, codes = factory[3:].split(",")
        assert memory_of(codes, n, 512, int(lists)) <= memory
        faiss.index_factory(512, factory)  # a string FAISS builds
    with pytest.raises(SeesayError, match="need at least"):
        choose_factory(100_000_000, 512, 2**20)
