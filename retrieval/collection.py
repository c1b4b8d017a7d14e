"""A collection: an index together with the encoder that fills it and encodes its queries.

The index (`indexer.Index`) stores rows and vectors and keeps the encoder's saved folder
as an opaque artefact; this layer saves the encoder there when the index is made,
loads it back for queries, and refuses to mix encoders in one index.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np

from indexer import BuiltBy, Index, IndexExistsError, NewItem
from retrieval.datasets import Record
from retrieval.encoders.base import Encoder, TextQueries, read_manifest, verify_weights
from retrieval.encoders.registry import load_encoder, load_text_queries
from retrieval.errors import EncoderError, IndexMismatchError
from retrieval.ingest import COMMIT_EVERY, AddReport, Encoded, Meter, encode_chunk

T = TypeVar("T", bound=TextQueries)


def built_by(encoder: Encoder) -> BuiltBy:
    """How the index records `encoder` (its identity names its weights' digest once saved)."""
    return BuiltBy(encoder.kind, encoder.identity, encoder.version, encoder.dim)


def same_encoder(recorded: str, encoder: Encoder) -> bool:
    """Whether `encoder` is the one recorded as `spec#digest`: same spec, and same weights where both are known."""
    spec, _, digest = recorded.partition("#")
    if spec != encoder.spec:
        return False
    return not (digest and encoder.digest) or encoder.digest.startswith(digest)


class Collection:
    """An index and its encoder: add records, and hand both to the query engine."""

    def __init__(self, index: Index, encoder: Encoder | None = None) -> None:
        self.index = index
        self._encoder = encoder
        self._text_queries: TextQueries | None = None

    @classmethod
    def create(
        cls, directory: str | Path, encoder: Encoder, factory: str = "Flat", db_url: str | None = None
    ) -> "Collection":
        """A new, empty index in `directory` built by `encoder`; an error if it already holds one."""

        def save(folder: Path) -> BuiltBy:
            encoder.save(folder)
            return built_by(encoder)  # after saving: the identity includes the saved weights' digest

        return cls(Index.create(directory, save, factory, db_url), encoder)

    @classmethod
    def open(cls, directory: str | Path, read_only: bool = False) -> "Collection":
        """An existing index; its encoder is loaded from the index on first use."""
        return cls(Index.open(directory, read_only=read_only))

    @classmethod
    def open_or_create(
        cls, directory: str | Path, encoder: Encoder, factory: str | None = None, db_url: str | None = None
    ) -> "Collection":
        """Open the index in `directory` if there is one (it must use `encoder`), else create it.

        `factory` (default Flat) and `db_url` choose how a new index is made; given for an
        existing index that was made otherwise, they are an error rather than ignored.
        """
        directory = Path(directory)
        if not Index.exists(directory):
            try:
                return cls.create(directory, encoder, factory or "Flat", db_url)
            except IndexExistsError:
                pass  # another process made it meanwhile: append to it like any existing index
        index = Index.open(directory, db_url=db_url)
        built = index.built_by
        factory_made = index.info().factory
        problem = None
        if built.dim != encoder.dim or not same_encoder(built.identity, encoder):
            problem = (
                f"index {directory} was built with encoder {built.identity!r} (dim {built.dim}), "
                f"not {encoder.identity!r} (dim {encoder.dim})"
            )
        elif factory is not None and factory != factory_made:
            problem = (
                f"index {directory} was made with FAISS factory {factory_made!r}; a factory ({factory!r}) "
                "only applies when an index is created: leave it out to add to this one, or index into a new folder"
            )
        if problem:
            index.close()
            raise IndexMismatchError(problem)
        return cls(index, encoder)

    def close(self) -> None:
        """Release the index's database connections."""
        self.index.close()

    def __enter__(self) -> "Collection":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def encoder(self) -> Encoder:
        """The index's encoder, loaded from DIR/encoder on first use (its weights verified, and its identity)."""
        if self._encoder is None:
            self._encoder = self._checked(load_encoder(self.index.artefact_dir))
        return self._encoder

    @property
    def text_queries(self) -> TextQueries:
        """What encodes text queries: the encoder once loaded, else its kind's light text path where
        it has one (no image side, no query bank, no torch for the towers kind), else the encoder."""
        if self._encoder is not None:
            return self._encoder
        if self._text_queries is None:
            light = load_text_queries(self.index.artefact_dir)
            if light is None:
                return self.encoder
            self._text_queries = self._checked(light)
        return self._text_queries

    def _checked(self, loaded: T) -> T:
        """`loaded` (an encoder or its text path) if it gives the index's dimension and is the index's builder."""
        if loaded.dim != self.index.built_by.dim:
            raise IndexMismatchError(
                f"{self.index.artefact_dir}: encoder gives dim {loaded.dim}, index holds {self.index.built_by.dim}"
            )
        problem = self._not_the_builder(loaded.digest)
        if problem:
            raise IndexMismatchError(problem)
        return loaded

    def _not_the_builder(self, digest: str | None) -> str | None:
        """Why an encoder folder whose weights have `digest` is not the one that built the index, or None."""
        recorded = self.index.built_by.identity.partition("#")[2]
        if recorded and not (digest or "").startswith(recorded):
            return (
                f"{self.index.artefact_dir} is not the encoder this index was built with: the index records "
                f"weights {recorded}…, the folder holds {(digest or 'unrecorded')[:16]}…"
            )
        return None

    def verify(self, deep: bool = True) -> list[str]:
        """Problems of the index (see `Index.verify`) and of its encoder folder, one line each; [] when sound.

        The encoder's weights are checked against its encoder.json, and encoder.json
        against the index's record, without loading the model.
        """
        problems = self.index.verify(deep=deep)
        folder = self.index.artefact_dir
        try:
            manifest = read_manifest(folder)
            verify_weights(folder, manifest)
        except EncoderError as exc:
            return problems + [str(exc)]
        problem = self._not_the_builder(manifest.get("digest"))
        return problems + ([problem] if problem else [])

    def add(
        self,
        records: Sequence[Record],
        batch_size: int = 64,
        progress: bool = False,
        *,
        workers: int = 4,
        commit_every: int = COMMIT_EVERY,
    ) -> AddReport:
        """Index records' images and captions, skipping what is already indexed and bad files.

        Commits every `commit_every` records, so an interrupted run keeps the chunks it
        finished and a re-run skips them.
        """
        index = self.index
        index.check_writable("add")
        report = AddReport()
        with Meter.shown(progress, len(records)) as meter:
            for start in range(0, len(records), commit_every):
                chunk = records[start : start + commit_every]
                encoded = encode_chunk(
                    chunk, self.encoder, index.built_by.dim, index.ids_by_hash, report, meter, batch_size, workers
                )
                if encoded.images or encoded.captions:
                    _store(index, encoded, report)
        return report


def _store(index: Index, encoded: Encoded, report: AddReport) -> None:
    """Add one encoded chunk; what another writer indexed meanwhile counts as already indexed."""
    store_rows(index, encoded.rows(), encoded.vectors(), report)


def store_rows(
    index: Index, rows: Sequence[NewItem], vectors: np.ndarray, report: AddReport, ids: Sequence[int] | None = None
) -> None:
    """Add rows with their vectors (and ids reserved for them, if any), counting what was added and skipped in `report`."""
    added = index.add_vectors(rows, vectors, ids=ids)
    report.images_added += added.count(rows, "image")
    report.captions_added += added.count(rows, "caption")
    for i in added.existing:
        if rows[i].kind == "image":
            report.images_skipped_existing += 1
        else:
            report.captions_skipped_existing += 1
    report.problems.extend(f"{rows[i].source_id}: image deleted while indexing; caption skipped" for i in added.orphaned)
