"""A FAISS index over some vectors of one kind, held with those vectors and their ids.

`VectorSet` is the in-memory unit: one segment of an index (see `indexer.segments`),
or a whole index in the benchmarks. The stored vectors are the source of truth: an
index type that cannot remove ids is rebuilt from them, and a type that needs
training is trained on them once there are enough.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

import faiss
import numpy as np

from indexer.exact_search import ExactSearch
from indexer.errors import SeesayError

T = TypeVar("T")
DEFAULT_SEARCH_PARAMS: dict[str, int] = {"nprobe": 16, "efSearch": 128}
# Largest k a FAISS GPU index answers; larger searches run on the CPU copy.
GPU_MAX_K = 2048
# Index types FAISS can copy to a GPU (others would come back as a second CPU copy).
_GPU_TYPES = (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer)


def build(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index from a FAISS factory string, able to hold arbitrary ids."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise SeesayError(f"bad FAISS factory string {factory!r} for dim {dim}: {faiss_reason(exc)}") from exc
    return index if _keeps_ids(index) else faiss.IndexIDMap2(index)


def read_or_fail(read: Callable[[Path], T], path: Path) -> T:
    """`read(path)`, with a truncated or corrupt file turned into one SeesayError naming it (FileNotFoundError stays)."""
    try:
        return read(path)
    except FileNotFoundError:
        raise
    except RuntimeError as exc:  # FAISS: the C++ exception's text, several lines
        raise SeesayError(f"{path} is truncated or corrupt ({faiss_reason(exc)})") from exc
    except (OSError, ValueError, EOFError) as exc:  # numpy: a short or garbled .npy
        raise SeesayError(f"{path} is truncated or corrupt ({exc})") from exc


def faiss_reason(exc: RuntimeError) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _keeps_ids(index: faiss.Index) -> bool:
    """True for types whose own add_with_ids and remove_ids keep ids right.

    IVF types store ids themselves, and IndexIDMap's remove_ids would garble them
    (it assumes the sub-index compacts in order, as flat indexes do).
    """
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return _keeps_ids(index.index)
    return isinstance(index, (faiss.IndexIVF, faiss.IndexIDMap, faiss.IndexIDMap2))


def _unwrapped(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def tunable(index: faiss.Index) -> set[str]:
    """Names of the search-time parameters (nprobe, efSearch, ...) that apply to `index`."""
    space = faiss.ParameterSpace()
    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = inner.index
    space.initialize(inner)
    return {space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())}


def training_need(index: faiss.Index) -> int:
    """Fewest vectors `index` can be trained on (1 for types that need no training)."""
    need = 1
    try:
        need = faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        pass  # not an IVF index
    pq = getattr(_unwrapped(index), "pq", None)
    if pq is not None:
        need = max(need, 1 << pq.nbits)
    return need


@dataclass
class VectorSet:
    """One FAISS index with the vectors and ids it was built from.

    """

    name: str
    factory: str
    index: faiss.Index
    vectors: np.ndarray
    ids: np.ndarray
    params: dict[str, int] = field(default_factory=dict)
    _device: faiss.Index | None = field(default=None, repr=False)
    _sorted: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _exact: ExactSearch | None = field(default=None, repr=False)

    @classmethod
    def empty(cls, name: str, dim: int, factory: str, params: Mapping[str, int] | None = None) -> "VectorSet":
        """A set with no items."""
        vectors = np.zeros((0, dim), dtype=np.float32)
        result = cls(name, factory, build(dim, factory), vectors, np.zeros(0, dtype=np.int64))
        result.set_params(params or {})
        return result

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def untrained(self) -> int:
        """How many more vectors this set needs before its index can be trained (0 once trained)."""
        return 0 if self.index.is_trained else max(0, training_need(self.index) - len(self.ids))

    def set_params(self, overrides: Mapping[str, int]) -> None:
        """Apply default search parameters, then `overrides`, where they fit this index type."""
        names = tunable(self.index)
        space = faiss.ParameterSpace()
        for name, value in {**DEFAULT_SEARCH_PARAMS, **overrides}.items():
            if name == "nprobe" and name in names:
                value = min(value, faiss.extract_index_ivf(self.index).nlist)
            if name in names:
                space.set_index_parameter(self.index, name, value)
        self.params = dict(overrides)
        self._device = None

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Append vectors with their ids (training the index first if it now can be)."""
        if not len(ids):
            return
        self.vectors = np.concatenate([self.vectors, vectors])
        self.ids = np.concatenate([self.ids, ids])
        self._changed()
        if self.index.is_trained:
            self.index.add_with_ids(vectors, ids)
        else:
            self._fill()

    def remove(self, ids: Iterable[int]) -> None:
        """Drop the given ids; index types without remove_ids are rebuilt from the stored vectors."""
        gone = np.fromiter(ids, dtype=np.int64)
        if not len(gone):
            return
        keep = ~np.isin(self.ids, gone)
        self.vectors = self.vectors[keep]
        self.ids = self.ids[keep]
        self._changed()
        if not self.index.is_trained:
            return
        try:
            self.index.remove_ids(faiss.IDSelectorBatch(gone))
        except RuntimeError:  # e.g. HNSW: this type cannot remove, so rebuild
            self.index = build(self.dim, self.factory)
            self.set_params(self.params)
            self._fill()

    def _fill(self) -> None:
        """Train on the stored vectors if enough are there, then add them all."""
        if len(self.ids) < training_need(self.index):
            return
        try:
            self.index.train(self.vectors)
        except RuntimeError as exc:
            raise SeesayError(
                f"FAISS index {self.factory!r} could not be trained on {len(self.ids)} "
                f"{self.name} vectors: {faiss_reason(exc)}"
            ) from exc
        self.index.add_with_ids(self.vectors, self.ids)

    def _changed(self) -> None:
        self._device = None
        self._sorted = None
        self._exact = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), each (nq, k); missing hits have id -1 and score -inf."""
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if not len(self.ids) or not len(queries):
            return scores, ids
        if not self.index.is_trained:
            # Too few vectors to train on yet (`training_need`): an exact scan of the stored ones answers meanwhile.
            if self._exact is None:
                self._exact = ExactSearch(self.vectors, self.ids)
            return self._exact.search(queries, k)
        kk = min(k, len(self.ids))
        index = self._on_device() if kk <= GPU_MAX_K else self.index
        if index is self.index and isinstance(_unwrapped(index), faiss.IndexFlat):
            # Exact search on the CPU: seesay's blocked GEMM or FAISS, whichever suits the batch.
            if self._exact is None:
                self._exact = ExactSearch(self.vectors, self.ids, flat=self.index)
            return self._exact.search(queries, k)
        found_scores, found_ids = index.search(queries, kk)
        scores[:, :kk] = np.where(found_ids >= 0, found_scores, -np.inf)
        ids[:, :kk] = found_ids
        return scores, ids

    def _on_device(self) -> faiss.Index:
        """A GPU copy when GPUs are present and the type has one; the CPU index otherwise."""
        if self._device is None:
            self._device = self.index
            if faiss.get_num_gpus() > 0 and isinstance(_unwrapped(self.index), _GPU_TYPES):
                try:
                    self._device = faiss.index_cpu_to_all_gpus(self.index)
                except RuntimeError:
                    pass  # a configuration the GPU code does not support: stay on the CPU
        return self._device

    def lookup(self, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors for `ids`, in order; an error names the ids not in this set."""
        wanted = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self._sorted is None:
            order = np.argsort(self.ids, kind="stable")
            self._sorted = order, self.ids[order]
        order, ordered = self._sorted
        pos = np.minimum(np.searchsorted(ordered, wanted), max(len(ordered) - 1, 0))
        found = (ordered[pos] == wanted) if len(ordered) else np.zeros(len(wanted), dtype=bool)
        if not found.all():
            raise SeesayError(f"no {self.name} vectors for ids {wanted[~found].tolist()}")
        return np.asarray(self.vectors[order[pos]])


def is_flat(index: faiss.Index) -> bool:
    """Whether `index` is a plain exact index, whose stored vectors are all it holds."""
    return isinstance(_unwrapped(index), faiss.IndexFlat)
