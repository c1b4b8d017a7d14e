"""A FAISS factory for a collection's size and a memory budget, after autofaiss's rule (ported, not imported).

autofaiss (`get_optimal_index_keys_v2`): below a few thousand vectors an exact index;
else an inverted file whose number of lists grows with the collection (about 4·√n,
rounded to a power of two, below 1M vectors; 2^14–2^16 up to 10M; 2^16–2^18 beyond),
with the finest codes that fit the memory budget. Here the codes tried, finest first,
are float32 (`Flat`), 8-bit scalar quantization (`SQ8`) and product quantization with
as many 8-bit sub-quantizers as fit (`PQm`, m dividing the dimension). Memory counts
the codes, the ids (8 bytes each) and the coarse centroids.
"""
from __future__ import annotations

import math
import re

from indexer.errors import SeesayError

FLAT_BELOW = 10_000  # exact search is fast enough and needs no training below this
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory(text: str) -> int:
    """Bytes from '4G', '512M', '1.5G', '1000000' (binary units); a SeesayError names a bad value."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not match:
        raise SeesayError(f"cannot read memory budget {text!r}: use e.g. 4G, 512M or a number of bytes")
    return int(float(match[1]) * _UNITS[match[2]])


def lists_for(n: int) -> int:
    """Inverted lists for n vectors (autofaiss's first choice at each size)."""
    if n < 1_000_000:
        return max(1, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))
    if n < 10_000_000:
        return 2**16
    return 2**18


def memory_of(factory_codes: str, n: int, dim: int, lists: int) -> int:
    """Bytes an IVF index with `lists` lists and these codes takes for n vectors of `dim`."""
    per_vector = {"Flat": 4 * dim, "SQ8": dim}.get(factory_codes)
    if per_vector is None:  # PQm: m bytes, plus the codebooks
        m = int(factory_codes[2:])
        return n * (m + 8) + lists * dim * 4 + 256 * dim * 4
    return n * (per_vector + 8) + lists * dim * 4


def choose_factory(n: int, dim: int, memory: int) -> str:
    """The factory string for about n vectors of `dim` within `memory` bytes; an error if none fits."""
    if n < FLAT_BELOW and n * dim * 4 <= memory:
        return "Flat"
    # FAISS wants ≥ 39 training vectors per list: at most the power of two below n / 39.
    lists = min(lists_for(n), 2 ** int(math.log2(max(n // 39, 1))))
    pq = [m for m in (256, 128, 64, 48, 32, 24, 16, 12, 8, 4) if m < dim and dim % m == 0]
    for codes in ("Flat", "SQ8", *(f"PQ{m}" for m in pq)):
        if memory_of(codes, n, dim, lists) <= memory:
            return f"IVF{lists},{codes}"
    smallest = memory_of(f"PQ{pq[-1]}", n, dim, lists) if pq else memory_of("SQ8", n, dim, lists)
    raise SeesayError(
        f"{n:,} vectors of dim {dim} need at least {smallest / 2**20:,.0f} MiB in any index seesay builds; "
        f"the budget is {memory / 2**20:,.0f} MiB"
    )
