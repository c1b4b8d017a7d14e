"""The on-disk index: a directory with the saved encoder, metadata database and FAISS files.

Layout of DIR:
  index.json                 {"format": "seesay-index", "version": 1, "db_url": null | URL}
  encoder/                   the encoder, saved so queries can be encoded without naming it
  meta.sqlite                items and manifest (unless another db_url was given)
  images.gG.{faiss,npy,ids.npy}, captions.gG.{...}   vectors of generation G

Every write runs in one SQL transaction that holds the manifest lock: rows are
inserted, generation G+1 files are written and renamed into place, the manifest
moves to G+1, then it commits. A crash before the commit leaves SQL at G and
orphan G+1 files, which the next writer removes; readers only ever load the
generation the committed manifest names.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from sqlalchemy.orm import Session

from indexer import store
from indexer.ingest import AddReport, Encoded, Meter, encode_chunk
from indexer.store import Item, ItemRow, Manifest, Store
from indexer.vectors import (
    VectorSet,
    generation_paths,
    remove_generations_below,
    remove_orphans,
    save_generation,
    tunable,
)
from retrieval.datasets import Record
from retrieval.encoders.base import Encoder
from retrieval.encoders.registry import load_encoder
from retrieval.errors import IndexMismatchError, ItemNotFoundError, SeesayError

FORMAT = "seesay-index"
FORMAT_VERSION = 1
INDEX_JSON = "index.json"
ENCODER_DIR = "encoder"
DEFAULT_DB = "meta.sqlite"
COMMIT_EVERY = 8192
# Set names on disk, by item kind.
SET_NAMES = {"image": "images", "caption": "captions"}
# How often a reader retries when writers delete the generation it is loading.
_LOAD_ATTEMPTS = 5


def same_encoder(recorded: str, encoder: Encoder) -> bool:
    """Whether `encoder` is the one recorded as `spec#digest`: same spec, and same weights where both are known."""
    spec, _, digest = recorded.partition("#")
    if spec != encoder.spec:
        return False
    return not (digest and encoder.digest) or encoder.digest.startswith(digest)


def default_db_url(directory: Path) -> str:
    """The SQLite database inside the index directory."""
    return f"sqlite:///{(directory / DEFAULT_DB).resolve()}"


def _read_index_json(directory: Path) -> dict:
    path = directory / INDEX_JSON
    if not path.is_file():
        raise SeesayError(f"{directory} is not a seesay index (no {INDEX_JSON})")
    try:
        meta = json.loads(path.read_text())
        version = meta["version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SeesayError(f"{path} is not a valid seesay index file: {exc}") from exc
    if meta.get("format") != FORMAT or version != FORMAT_VERSION:
        raise SeesayError(
            f"{directory}: index format {meta.get('format')!r} version {version}; "
            f"this seesay reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return meta


def _write_index_json(directory: Path, db_url: str | None) -> None:
    tmp = directory / (INDEX_JSON + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "db_url": db_url}, indent=2))
    os.replace(tmp, directory / INDEX_JSON)


class Index:
    """Images and captions with their vectors: add, delete, search, look up."""

    def __init__(self, directory: Path, db: Store, read_only: bool, encoder: Encoder | None = None) -> None:
        self.directory = directory
        self.read_only = read_only
        self._db = db
        self._manifest = db.manifest()
        self._encoder = encoder
        self._sets: dict[str, VectorSet] | None = None
        self._params: dict[str, int] = {}

    # ----- opening -----

    @classmethod
    def create(
        cls, directory: str | Path, encoder: Encoder, factory: str = "Flat", db_url: str | None = None
    ) -> "Index":
        """Make a new, empty index in `directory`; an error if it already holds one."""
        directory = Path(directory)
        if (directory / INDEX_JSON).exists():
            raise SeesayError(f"{directory} already holds a seesay index")
        sets = [VectorSet.empty(name, encoder.dim, factory) for name in SET_NAMES.values()]
        directory.mkdir(parents=True, exist_ok=True)
        encoder.save(directory / ENCODER_DIR)
        db = Store(db_url or default_db_url(directory))
        save_generation(sets, directory, 0)
        db.initialise(
            Manifest(
                encoder_kind=encoder.kind,
                encoder_spec=encoder.identity,
                encoder_version=encoder.version,
                dim=encoder.dim,
                factory=factory,
            )
        )
        _write_index_json(directory, db_url)
        return cls(directory, db, read_only=False, encoder=encoder)

    @classmethod
    def open(cls, directory: str | Path, read_only: bool = False) -> "Index":
        """Open an existing index; writable opens also clear what a crashed writer left."""
        directory = Path(directory)
        meta = _read_index_json(directory)
        index = cls(directory, Store(meta.get("db_url") or default_db_url(directory)), read_only)
        if not read_only:
            with index._db.writing() as (_, manifest):
                remove_orphans(directory, manifest.generation)
        return index

    @classmethod
    def open_or_create(
        cls, directory: str | Path, encoder: Encoder, factory: str = "Flat", db_url: str | None = None
    ) -> "Index":
        """Open the index in `directory` if there is one (it must use `encoder`), else create it.

        `factory` and `db_url` only apply when creating.
        """
        directory = Path(directory)
        if not (directory / INDEX_JSON).exists():
            return cls.create(directory, encoder, factory, db_url)
        index = cls.open(directory)
        built = index._manifest
        if built.dim != encoder.dim or not same_encoder(built.encoder_spec, encoder):
            index.close()
            raise IndexMismatchError(
                f"index {directory} was built with encoder {built.encoder_spec!r} (dim {built.dim}), "
                f"not {encoder.identity!r} (dim {encoder.dim})"
            )
        index._encoder = encoder
        return index

    def close(self) -> None:
        """Release database connections."""
        self._db.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def encoder(self) -> Encoder:
        """The index's encoder, loaded from DIR/encoder on first use."""
        if self._encoder is None:
            encoder = load_encoder(self.directory / ENCODER_DIR)
            if encoder.dim != self._manifest.dim:
                raise IndexMismatchError(
                    f"{self.directory / ENCODER_DIR}: encoder gives dim {encoder.dim}, index holds {self._manifest.dim}"
                )
            self._encoder = encoder
        return self._encoder

    # ----- reading -----

    def _loaded(self) -> dict[str, VectorSet]:
        """The vector sets of the committed generation, loading them if needed."""
        if self._sets is not None:
            return self._sets
        tried: set[int] = set()
        for _ in range(_LOAD_ATTEMPTS):
            manifest = self._db.manifest()
            try:
                self._sets = self._read_sets(manifest.generation)
                self._manifest = manifest
                return self._sets
            except FileNotFoundError as exc:
                if manifest.generation in tried:  # not a writer racing us: the files are gone
                    raise SeesayError(f"index {self.directory} is missing {exc.filename or exc}") from exc
                tried.add(manifest.generation)
        raise SeesayError(f"index {self.directory} kept changing while loading; try again")

    def _read_sets(self, generation: int) -> dict[str, VectorSet]:
        return {
            kind: VectorSet.load(self.directory, name, generation, self._manifest.factory, self._params)
            for kind, name in SET_NAMES.items()
        }

    def refresh(self) -> bool:
        """Follow other writers: reload if the committed generation moved; True if it did."""
        manifest = self._db.manifest()
        if manifest.generation == self._manifest.generation:
            return False
        self._manifest = manifest
        self._sets = None
        return True

    @property
    def generation(self) -> int:
        """The generation this object reads; it moves on `refresh()`, never by itself."""
        return self._manifest.generation

    def load(self) -> "Index":
        """Load the committed generation's vectors now rather than at the first search; returns self.

        A loaded read-only index that is never refreshed is an immutable snapshot that
        threads may search at once.
        """
        self._loaded()
        return self

    def _set(self, kind: str) -> VectorSet:
        if kind not in SET_NAMES:
            raise SeesayError(f"unknown item kind {kind!r}: use 'image' or 'caption'")
        return self._loaded()[kind]

    def search(self, kind: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) among items of `kind` ("image" or "caption"), each (nq, k).

        Rows are padded with id -1 and score -inf when fewer than k items exist.
        """
        vector_set = self._set(kind)
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self._manifest.dim:
            raise IndexMismatchError(
                f"query vectors have shape {queries.shape}; index {self.directory} holds dim {self._manifest.dim}"
            )
        if k < 1:
            raise SeesayError(f"k must be at least 1, got {k}")
        return vector_set.search(queries, k)

    def set_search_params(self, **params: int) -> None:
        """Override FAISS search parameters (e.g. nprobe=64, efSearch=256) for this session."""
        sets = self._loaded()
        known = set().union(*(tunable(s.index) for s in sets.values()))
        unknown = sorted(set(params) - known)
        if unknown:
            raise SeesayError(
                f"search parameter(s) {', '.join(unknown)} do not apply to FAISS index "
                f"{self._manifest.factory!r} (it takes: {', '.join(sorted(known)) or 'none'})"
            )
        self._params = {**self._params, **params}
        for vector_set in sets.values():
            vector_set.set_params(self._params)

    def items(self, ids: Sequence[int]) -> list[Item]:
        """Items by id, in the order given; an error names ids that are not in the index."""
        ids = [int(i) for i in ids]
        found = self._db.items(ids)
        missing = [i for i in ids if i not in found]
        if missing:
            raise ItemNotFoundError(f"no items with ids {missing} in index {self.directory}", missing)
        return [found[i] for i in ids]

    def captions_of(self, image_item_id: int) -> list[Item]:
        """The captions of one image item."""
        return self._db.captions_of(int(image_item_id))

    def captions_by_image(self, image_item_ids: Sequence[int]) -> dict[int, list[Item]]:
        """The captions of many image items at once: {image id: captions}."""
        return self._db.captions_by_image([int(i) for i in image_item_ids])

    def vectors(self, kind: str, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors of items of `kind`, by id, as an (n, dim) float32 array."""
        return self._set(kind).lookup(ids)

    def info(self) -> dict:
        """Manifest, counts, current files and database of this index."""
        manifest = self._db.manifest()
        files = {
            path.name: path.stat().st_size
            for name in SET_NAMES.values()
            for path in generation_paths(self.directory, name, manifest.generation)
            if path.exists()
        }
        return {
            "directory": str(self.directory),
            "format_version": FORMAT_VERSION,
            "db_url": self._db.display_url,
            "encoder": {
                "kind": manifest.encoder_kind,
                "spec": manifest.encoder_spec,
                "version": manifest.encoder_version,
            },
            "dim": manifest.dim,
            "metric": manifest.metric,
            "factory": manifest.factory,
            "generation": manifest.generation,
            "n_images": manifest.n_images,
            "n_captions": manifest.n_captions,
            "created_at": manifest.created_at.isoformat(),
            "updated_at": manifest.updated_at.isoformat(),
            "files": files,
            "search_params": dict(self._params),
            "read_only": self.read_only,
        }

    # ----- writing -----

    def _require_writable(self, action: str) -> None:
        if self.read_only:
            raise SeesayError(f"index {self.directory} is open read-only: cannot {action}")

    @contextmanager
    def _writing(self, action: str) -> Iterator[tuple[Session, dict[str, VectorSet]]]:
        """A locked transaction over the latest generation; commits it as the next one."""
        self._require_writable(action)
        try:
            with self._db.writing() as (session, manifest):
                remove_orphans(self.directory, manifest.generation)
                if self._sets is None or self._manifest.generation != manifest.generation:
                    self._sets = self._read_sets(manifest.generation)
                yield session, self._sets
                session.flush()
                for kind, vector_set in self._sets.items():
                    rows = store.count(session, kind)
                    if rows != len(vector_set.ids):
                        raise SeesayError(
                            f"index {self.directory}: {rows} {kind} rows but {len(vector_set.ids)} vectors"
                        )
                save_generation(self._sets.values(), self.directory, manifest.generation + 1)
                manifest.generation += 1
                manifest.n_images = len(self._sets["image"].ids)
                manifest.n_captions = len(self._sets["caption"].ids)
                manifest.updated_at = store.utcnow()
        except BaseException:
            self._sets = None  # memory may hold the uncommitted change: reload the committed state
            raise
        self._manifest = manifest
        remove_generations_below(self.directory, manifest.generation - 1)

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

        Commits every `commit_every` records, so an interrupted run keeps the chunks
        it finished and a re-run skips them.
        """
        self._require_writable("add")
        report = AddReport()
        with Meter.shown(progress, len(records)) as meter:
            for start in range(0, len(records), commit_every):
                chunk = records[start : start + commit_every]
                encoded = encode_chunk(
                    chunk, self.encoder, self._manifest.dim, self._db.ids_by_hash, report, meter, batch_size, workers
                )
                if encoded.images or encoded.captions:
                    self._store(encoded, report)
        return report

    def _store(self, encoded: Encoded, report: AddReport) -> None:
        """Insert one encoded chunk; hashes indexed meanwhile by another writer are skipped."""
        with self._writing("add") as (session, sets):
            indexed = store.ids_by_hash(session, "image", [new.hash for new in encoded.images])
            fresh = [i for i, new in enumerate(encoded.images) if new.hash not in indexed]
            report.images_skipped_existing += len(encoded.images) - len(fresh)
            rows = [
                ItemRow(
                    kind="image",
                    source_id=new.record.image_id,
                    path=str(new.record.image_path),
                    split=new.record.split,
                    hash=new.hash,
                )
                for new in (encoded.images[i] for i in fresh)
            ]
            report.images_added += _insert(session, rows, encoded.image_vectors[fresh], sets["image"])

            images = store.ids_by_hash(session, "image", [new.image_hash for new in encoded.captions])
            indexed = store.ids_by_hash(session, "caption", [new.hash for new in encoded.captions])
            fresh = []
            for i, new in enumerate(encoded.captions):
                if new.hash in indexed:
                    report.captions_skipped_existing += 1
                elif new.image_hash not in images:
                    report.problems.append(f"{new.record.image_id}: image deleted while indexing; caption skipped")
                else:
                    fresh.append(i)
            rows = [
                ItemRow(
                    kind="caption",
                    source_id=new.record.image_id,
                    text=new.text,
                    image_item_id=images[new.image_hash],
                    split=new.record.split,
                    hash=new.hash,
                )
                for new in (encoded.captions[i] for i in fresh)
            ]
            report.captions_added += _insert(session, rows, encoded.caption_vectors[fresh], sets["caption"])

    def delete(self, ids: Sequence[int]) -> int:
        """Delete items by id (an image takes its captions along); returns how many went.

        Unknown ids are an error naming them, and then nothing is deleted.
        """
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        with self._writing("delete") as (session, sets):
            rows = store.rows_by_id(session, ids)
            unknown = sorted(set(ids) - {row.id for row in rows})
            if unknown:
                raise SeesayError(f"no items with ids {unknown} in index {self.directory}; nothing deleted")
            images = [row.id for row in rows if row.kind == "image"]
            captions = {row.id for row in rows if row.kind == "caption"}
            captions.update(store.caption_ids_of(session, images))
            store.delete_ids(session, images + sorted(captions))
            sets["image"].remove(images)
            sets["caption"].remove(captions)
        return len(images) + len(captions)


def _insert(session: Session, rows: list[ItemRow], vectors: np.ndarray, vector_set: VectorSet) -> int:
    """Insert rows, then their vectors under the ids the database gave them; returns the count."""
    session.add_all(rows)
    session.flush()
    vector_set.add(vectors, np.array([row.id for row in rows], dtype=np.int64))
    return len(rows)
