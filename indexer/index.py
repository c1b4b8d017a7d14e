"""The on-disk index: a directory with the saved encoder, metadata database and FAISS files.

The storage engine: it takes rows and their vectors and never encodes anything.

Layout of DIR:
  index.json                 {"format": "seesay-index", "version": 1, "db_url": null | URL}
  encoder/                   the encoder's saved folder, kept as an opaque artefact for the layer above
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
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import faiss
import numpy as np
from sqlalchemy import insert
from sqlalchemy.orm import Session

from indexer import db_url as db_url_rules
from indexer import store
from indexer.errors import IndexExistsError, IndexMismatchError, ItemNotFoundError, SeesayError
from indexer.files import write_atomic
from indexer.items import Added, BuiltBy, Item, NewItem
from indexer.store import ItemRow, Manifest, Store
from indexer.vectors import (
    VectorSet,
    read_or_fail,
    generation_paths,
    remove_generations_below,
    remove_orphans,
    save_generation,
    tunable,
)

FORMAT = "seesay-index"
FORMAT_VERSION = 1
INDEX_JSON = "index.json"
ENCODER_DIR = "encoder"
DEFAULT_DB = "meta.sqlite"
# Set names on disk, by item kind.
SET_NAMES = {"image": "images", "caption": "captions"}
# Files of a generation (images.g3.faiss, ...): their presence marks a half-made index.
_GENERATION_NAME = re.compile(r"^(images|captions)\.g\d+\.")
# How often a reader retries when writers delete the generation it is loading.
_LOAD_ATTEMPTS = 5


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


def _staging_prefix(directory: Path) -> str:
    return f".{directory.name}.creating-"


def _check_creatable(directory: Path) -> None:
    """Refuse folders that hold an index, a file, or anything else: an index gets a folder of its own."""
    if Index.exists(directory):
        raise IndexExistsError(f"{directory} already holds a seesay index")
    if directory.exists() and not directory.is_dir():
        raise SeesayError(f"{directory} is a file, not a folder for an index")
    if directory.is_dir() and any(directory.iterdir()):
        names = {path.name for path in directory.iterdir()}
        if names & {ENCODER_DIR, DEFAULT_DB} or any(_GENERATION_NAME.match(name) for name in names):
            raise SeesayError(
                f"{directory} holds a half-made index (no {INDEX_JSON}), left by an interrupted creation: "
                "remove the folder and index again"
            )
        raise SeesayError(f"{directory} is not empty and holds no seesay index: give a new or empty folder")


def _remove_dead_staging(directory: Path) -> None:
    """Remove staging folders of creations whose process is gone (killed, or the machine restarted)."""
    prefix = _staging_prefix(directory)
    for path in directory.parent.glob(prefix + "*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(staging: Path, directory: Path) -> None:
    """Rename the finished staging folder to `directory` (absent or empty); IndexExistsError if another won."""
    _fsync_folder(staging)
    try:
        os.rename(staging, directory)  # replaces an empty folder; fails on a non-empty one
    except OSError as exc:
        if Index.exists(directory):
            raise IndexExistsError(f"{directory} already holds a seesay index (made by another process meanwhile)") from exc
        raise
    _fsync_folder(directory.parent)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_index_json(directory: Path, db_url: str | None) -> None:
    write_atomic(directory / INDEX_JSON, json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "db_url": db_url}, indent=2))


class Index:
    """Images and captions with their vectors: add, delete, search, look up."""

    def __init__(self, directory: Path, db: Store, read_only: bool, db_url: str | None = None) -> None:
        self.directory = directory
        self.read_only = read_only
        self.db_url = db_url  # as index.json records it (no password); None: DIR/meta.sqlite
        self._db = db
        self._manifest = db.manifest()
        self._sets: dict[str, VectorSet] | None = None
        self._params: dict[str, int] = {}

    # ----- opening -----

    @classmethod
    def create(
        cls,
        directory: str | Path,
        save_artefact: Callable[[Path], BuiltBy],
        factory: str = "Flat",
        db_url: str | None = None,
    ) -> "Index":
        """Make a new, empty index in `directory`; IndexExistsError if it already holds one.

        `save_artefact(folder)` writes the encoder's files into DIR/encoder and returns
        how the manifest should record that encoder. Everything is built in a hidden
        staging folder beside `directory`, index.json last, and moved into place with one
        rename: a failed or killed creation leaves no index folder behind, and of two
        processes creating the same index one wins and the other gets IndexExistsError.
        A relative SQLite `db_url` is made absolute; index.json records the URL without
        its password (see `indexer.db_url`).
        """
        directory = Path(directory)
        _check_creatable(directory)
        db_url = db_url and db_url_rules.resolved(db_url)
        directory.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_staging(directory)
        staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(directory)}{os.getpid()}-", dir=directory.parent))
        db: Store | None = None
        initialised = False
        try:
            built_by = save_artefact(staging / ENCODER_DIR)
            sets = [VectorSet.empty(name, built_by.dim, factory) for name in SET_NAMES.values()]
            save_generation(sets, staging, 0)
            db = Store(db_url or default_db_url(staging))
            db.initialise(
                Manifest(
                    encoder_kind=built_by.kind,
                    encoder_spec=built_by.identity,
                    encoder_version=built_by.version,
                    dim=built_by.dim,
                    factory=factory,
                )
            )
            initialised = True
            db.close()  # an SQLite database checkpoints its WAL into meta.sqlite here
            _write_index_json(staging, db_url and db_url_rules.without_password(db_url))
            _move_into_place(staging, directory)
        except BaseException as exc:
            if db is not None:
                if initialised and db_url is not None:
                    db.drop()  # a database outside the folder would otherwise say "already holds" forever
                db.close()
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError):
                raise SeesayError(f"cannot create an index in {directory}: {exc.strerror or exc}: {exc.filename or ''}") from exc
            raise
        return cls.open(directory, db_url=db_url)  # with the password, which index.json does not keep

    @staticmethod
    def exists(directory: str | Path) -> bool:
        """Whether `directory` holds an index (its index.json)."""
        return (Path(directory) / INDEX_JSON).exists()

    @classmethod
    def open(cls, directory: str | Path, read_only: bool = False, db_url: str | None = None) -> "Index":
        """Open an existing index; writable opens also clear what a crashed writer left.

        `db_url` may repeat the recorded database URL with its password; naming another
        database is an error (the URL is chosen when the index is made).
        """
        directory = Path(directory)
        meta = _read_index_json(directory)
        recorded = meta.get("db_url")
        if db_url is not None:
            db_url = db_url_rules.resolved(db_url)
            if db_url_rules.without_password(db_url) != (recorded or default_db_url(directory)):
                raise IndexMismatchError(
                    f"index {directory} keeps its metadata in {db_url_rules.without_password(recorded or default_db_url(directory))}; "
                    "a database URL only applies when an index is created: leave it out to add to this one"
                )
        db = Store(db_url or (db_url_rules.with_password(recorded) if recorded else default_db_url(directory)))
        index = cls(directory, db, read_only, db_url=recorded)
        if not read_only:
            with index._db.writing() as (_, manifest):
                remove_orphans(directory, manifest.generation)
        return index

    def close(self) -> None:
        """Release database connections."""
        self._db.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def built_by(self) -> BuiltBy:
        """The encoder that made this index's vectors, as recorded when it was created."""
        m = self._manifest
        return BuiltBy(m.encoder_kind, m.encoder_spec, m.encoder_version, m.dim)

    @property
    def artefact_dir(self) -> Path:
        """DIR/encoder: the encoder's saved folder, for the layer that encodes queries."""
        return self.directory / ENCODER_DIR

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

    def training_shortfall(self) -> dict[str, int]:
        """For each kind whose FAISS index still waits for training data, how many more vectors it needs.

        Until then that kind is searched by an exact scan of its stored vectors.
        """
        return {kind: s.untrained for kind, s in self._loaded().items() if s.untrained}

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

    def images_under(self, prefix: str | None = None) -> list[Item]:
        """Image items whose stored path starts with `prefix` (all images for None), in id order."""
        return self._db.images_under(prefix)

    def ids_by_hash(self, kind: str, hashes: Sequence[str]) -> dict[str, int]:
        """Committed item ids of `kind` whose content hash is among `hashes`."""
        return self._db.ids_by_hash(kind, hashes)

    def vectors(self, kind: str, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors of items of `kind`, by id, as an (n, dim) float32 array."""
        return self._set(kind).lookup(ids)

    def all_vectors(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Every stored (ids, vectors) of `kind` at the committed generation, in storage order."""
        vector_set = self._set(kind)
        return vector_set.ids, vector_set.vectors

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

    def verify(self, deep: bool = False) -> list[str]:
        """Problems of the committed generation, one line each naming the file; [] for a sound index.

        Always: every file is there, the vectors and ids files hold as many rows as SQL
        has items of their kind and as the manifest counts, in the index's dimension.
        `deep` also reads each FAISS file and checks its count, and that the stored ids
        are exactly SQL's ids and that no caption points at a missing image.
        """
        problems: list[str] = []
        manifest = self._db.manifest()
        with self._db.session() as session:
            counts = {kind: store.count(session, kind) for kind in SET_NAMES}
            sql_ids = {kind: store.ids_of(session, kind) for kind in SET_NAMES} if deep else {}
            dangling = store.dangling_captions(session) if deep else 0
        recorded = {"image": manifest.n_images, "caption": manifest.n_captions}
        for kind, name in SET_NAMES.items():
            index_path, vectors_path, ids_path = generation_paths(self.directory, name, manifest.generation)
            missing = [path for path in (index_path, vectors_path, ids_path) if not path.is_file()]
            if missing:
                problems += [f"{path} is missing" for path in missing]
                continue
            try:
                vectors = read_or_fail(lambda path: np.load(path, mmap_mode="r"), vectors_path)
                ids = read_or_fail(lambda path: np.load(path, mmap_mode="r"), ids_path)
            except SeesayError as exc:
                problems.append(str(exc))
                continue
            if vectors.ndim != 2 or vectors.shape[1] != manifest.dim:
                problems.append(f"{vectors_path} holds vectors of shape {vectors.shape}, not (n, {manifest.dim})")
            if not len(vectors) == len(ids) == counts[kind] == recorded[kind]:
                problems.append(
                    f"{name}.g{manifest.generation}: {len(vectors)} vectors and {len(ids)} ids, but SQL holds "
                    f"{counts[kind]} {kind}s and the manifest counts {recorded[kind]}"
                )
            if deep:
                problems += self._verify_deep(index_path, ids, sql_ids[kind], kind)
        if dangling:
            problems.append(f"{self._db.display_url}: {dangling} captions point at no image")
        return problems

    def _verify_deep(self, index_path: Path, ids: np.ndarray, sql_ids: list[int], kind: str) -> list[str]:
        problems = []
        try:
            index = read_or_fail(lambda path: faiss.read_index(str(path)), index_path)
        except SeesayError as exc:
            return [str(exc)]
        if index.d != self._manifest.dim:
            problems.append(f"{index_path} holds dimension {index.d}, not {self._manifest.dim}")
        if index.is_trained and index.ntotal != len(ids):
            problems.append(f"{index_path} holds {index.ntotal} vectors, the ids file {len(ids)}")
        if sorted(np.asarray(ids).tolist()) != sql_ids:
            problems.append(f"{index_path.with_suffix('').with_suffix('')}.ids.npy: the stored {kind} ids differ from SQL's")
        return problems

    # ----- writing -----

    def check_writable(self, action: str) -> None:
        """SeesayError when the index is open read-only."""
        if self.read_only:
            raise SeesayError(f"index {self.directory} is open read-only: cannot {action}")

    @contextmanager
    def _writing(self, action: str) -> Iterator[tuple[Session, dict[str, VectorSet]]]:
        """A locked transaction over the latest generation; commits it as the next one."""
        self.check_writable(action)
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

    def add_vectors(self, rows: Sequence[NewItem], vectors: np.ndarray) -> Added:
        """Store rows with their vectors (one per row) in one transaction; returns the ids they got.

        Rows whose hash is already indexed are skipped, and so are captions whose image is
        neither indexed nor among `rows` (deleted meanwhile by another writer).
        """
        self.check_writable("add")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(rows), self._manifest.dim):
            raise IndexMismatchError(
                f"{len(rows)} rows came with vectors of shape {vectors.shape}; "
                f"index {self.directory} holds dim {self._manifest.dim}"
            )
        if not np.isfinite(vectors).all():
            raise SeesayError(f"vectors for index {self.directory} contain NaN or infinity; nothing added")
        added = Added(ids=[None] * len(rows))
        if not rows:
            return added
        with self._writing("add") as (session, sets):
            images = [i for i, row in enumerate(rows) if row.kind == "image"]
            indexed = store.ids_by_hash(session, "image", [rows[i].hash for i in images])
            fresh = self._fresh(rows, images, indexed, added)
            _insert(session, rows, fresh, vectors, sets["image"], added, lambda row: None)
            captions = [i for i, row in enumerate(rows) if row.kind == "caption"]
            image_ids = store.ids_by_hash(session, "image", [rows[i].image_hash for i in captions])
            indexed = store.ids_by_hash(session, "caption", [rows[i].hash for i in captions])
            fresh = self._fresh(rows, captions, indexed, added)
            added.orphaned = [i for i in fresh if rows[i].image_hash not in image_ids]
            fresh = [i for i in fresh if rows[i].image_hash in image_ids]
            _insert(session, rows, fresh, vectors, sets["caption"], added, lambda row: image_ids[row.image_hash])
        return added

    @staticmethod
    def _fresh(rows: Sequence[NewItem], positions: list[int], indexed: dict[str, int], added: Added) -> list[int]:
        """Positions whose hash is neither indexed nor repeated earlier; the rest are marked existing."""
        seen = set(indexed)
        fresh = []
        for i in positions:
            if rows[i].hash in seen:
                added.existing.append(i)
            else:
                seen.add(rows[i].hash)
                fresh.append(i)
        return fresh

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


    def set_paths(self, paths: dict[int, str]) -> None:
        """Point image items at new files ({item id: path}), e.g. after the files moved; vectors stay."""
        if not paths:
            return
        with self._writing("set paths") as (session, _sets):
            rows = store.rows_by_id(session, paths)
            wrong = sorted(set(paths) - {row.id for row in rows if row.kind == "image"})
            if wrong:
                raise ItemNotFoundError(f"no image items with ids {wrong} in index {self.directory}; no path changed", wrong)
            store.set_paths(session, paths)


def _insert(
    session: Session,
    rows: Sequence[NewItem],
    positions: list[int],
    vectors: np.ndarray,
    vector_set: VectorSet,
    added: Added,
    image_item_id: Callable[[NewItem], int | None],
) -> None:
    """Insert the rows at `positions`, then their vectors under the ids the database gave them."""
    if not positions:
        return
    values = [
        {
            "kind": row.kind,
            "source_id": row.source_id,
            "path": row.path,
            "text": row.text,
            "image_item_id": image_item_id(row),
            "split": row.split,
            "hash": row.hash,
            "created_at": store.utcnow(),
        }
        for row in (rows[i] for i in positions)
    ]
    ids = session.scalars(insert(ItemRow).returning(ItemRow.id, sort_by_parameter_order=True), values).all()
    for i, item_id in zip(positions, ids):
        added.ids[i] = item_id
    vector_set.add(vectors[positions], np.array(ids, dtype=np.int64))
