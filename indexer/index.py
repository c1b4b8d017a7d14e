"""The on-disk index: a directory with the saved encoder, metadata database and vector segments.

The storage engine: it takes rows and their vectors and never encodes anything.

Layout of DIR (format version 4):
  index.json                 {"format": "seesay-index", "version": 4, "db_url": null | URL}
  encoder/                   the encoder's saved folder, kept as an opaque artefact for the layer above
  meta.sqlite                items, segments, tombstones and manifest (unless another db_url was given)
  images.sS.{npy,ids.npy,hashes.npy[,faiss]}, captions.sS.{...}   immutable segments (see indexer.segments)

Every write runs in one SQL transaction that holds the manifest lock. An add inserts its
rows, writes one new segment per kind it touches and records it in the `segments` table;
a delete removes the rows and records tombstones; a merge writes one segment from several
and retires them. The commit makes the change visible at once; a crash before it leaves
files no committed segment names, which the next writer removes. Readers load only the
segments of one committed state, and keep loaded segments across states (they never change).
Content hashes are looked up in the segments' key tables (`indexer.hash_keys`), not in a
database index, and kept unique per kind under the write lock; item ids come from the
manifest's counter under that lock, so no id is given twice on any database.
Formats 1 (one set of files per generation), 2 (no key tables; a unique (kind, hash)
index in the database) and 3 (ids from the database's own counter, which only SQLite and
PostgreSQL keep) are migrated on the first writable open (`indexer.migrate`); format 3
can also be read as it is.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import faiss
import numpy as np
from sqlalchemy.orm import Session

from indexer import compaction, hash_keys, store
from indexer import db_url as db_url_rules
from indexer.errors import IndexExistsError, IndexMismatchError, ItemNotFoundError, SeesayError
from indexer.files import write_atomic
from indexer.items import Added, BuiltBy, EncoderInfo, IndexInfo, Item, NewItem
from indexer.merging import Merger, alive, merge_lock, remove_dead_staging, staging
from indexer.migrate import add_manifest_columns, migrate_v1, migrate_v2, migrate_v3
from indexer.segments import (
    SEGMENT_FILE,
    Loaded,
    SegmentSet,
    Source,
    fsync_directory,
    load_segment,
    make_part,
    read_ids,
    read_keys,
    read_template,
    read_vectors,
    remove_segments,
    segment_paths,
    write_merged,
    write_segment,
)
from indexer.store import Manifest, SegmentRow, Store
from indexer.vectors import VectorSet, build, faiss_reason, is_flat, read_or_fail, training_need

FORMAT = "seesay-index"
FORMAT_VERSION = 4
# Older versions a read-only open reads as they are: format 3 lacks only the id counter, which readers never use.
READ_AS_IS = (3,)
INDEX_JSON = "index.json"
ENCODER_DIR = "encoder"
DEFAULT_DB = "meta.sqlite"
# Set names on disk, by item kind.
SET_NAMES = {"image": "images", "caption": "captions"}
# How often a reader retries when a merge removes a segment it is loading.
_LOAD_ATTEMPTS = 5


def default_db_url(directory: Path) -> str:
    """The SQLite database inside the index directory."""
    return f"sqlite:///{(directory / DEFAULT_DB).resolve()}"


def _read_index_json(directory: Path, read_only: bool) -> dict:
    path = directory / INDEX_JSON
    if not path.is_file():
        raise SeesayError(f"{directory} is not a seesay index (no {INDEX_JSON})")
    try:
        meta = json.loads(path.read_text())
        version = meta["version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SeesayError(f"{path} is not a valid seesay index file: {exc}") from exc
    if meta.get("format") == FORMAT and version in (1, 2, 3):
        if read_only and version not in READ_AS_IS:
            raise SeesayError(
                f"{directory}: index format version {version} must be migrated to version {FORMAT_VERSION} first: "
                f"run `seesay compact --index {directory}` once"
            )
        return meta
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
        if names & {ENCODER_DIR, DEFAULT_DB} or any(SEGMENT_FILE.match(name) for name in names):
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
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


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
    """Images and captions with their vectors: add, delete, search, look up, compact."""

    def __init__(self, directory: Path, db: Store, read_only: bool, db_url: str | None = None, format_version: int = FORMAT_VERSION) -> None:
        self.directory = directory
        self.read_only = read_only
        self.format_version = format_version  # of index.json: an older readable one when opened read-only
        self.db_url = db_url  # as index.json records it (no password); None: DIR/meta.sqlite
        self._db = db
        self._manifest = db.manifest()
        self._sets: dict[str, SegmentSet] | None = None
        self._segments: dict[int, VectorSet] = {}  # loaded segments by id: immutable, kept across states
        self._ids: dict[int, np.ndarray] = {}  # item ids of segments, by id, for deletes
        self._keys: dict[int, np.ndarray] = {}  # hash key tables of segments, by id (memory-mapped)
        self._params: dict[str, int] = {}
        self._retired: set[int] = set()  # segments the open write transaction retires
        self._recorded: list[SegmentRow] = []  # and those it records
        self._merger = None if read_only else Merger(_background_merge(self), str(directory))

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
            build(built_by.dim, factory)  # a bad factory string fails here, before anything is recorded
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
        """Open an existing index; writable opens also clear what a crashed writer left,
        and migrate an index of format version 1, 2 or 3 (a read-only open reads format 3 as it is).

        `db_url` may repeat the recorded database URL with its password; naming another
        database is an error (the URL is chosen when the index is made).
        """
        directory = Path(directory)
        meta = _read_index_json(directory, read_only)
        recorded = meta.get("db_url")
        if db_url is not None:
            db_url = db_url_rules.resolved(db_url)
            if db_url_rules.without_password(db_url) != (recorded or default_db_url(directory)):
                raise IndexMismatchError(
                    f"index {directory} keeps its metadata in {db_url_rules.without_password(recorded or default_db_url(directory))}; "
                    "a database URL only applies when an index is created: leave it out to add to this one"
                )
        db = Store(db_url or (db_url_rules.with_password(recorded) if recorded else default_db_url(directory)))
        version = meta["version"]
        if version < FORMAT_VERSION and not read_only:
            add_manifest_columns(db)  # before anything reads the manifest: it maps them
            if version == 1:
                migrate_v1(directory, db, SET_NAMES)
            if version in (1, 2):
                migrate_v2(directory, db, SET_NAMES)
            migrate_v3(db)
            _write_index_json(directory, recorded)
            version = FORMAT_VERSION
        index = cls(directory, db, read_only, db_url=recorded, format_version=version)
        if not read_only:
            remove_dead_staging(directory)
            with index._db.writing() as (session, _):
                remove_segments(directory, keep={row.id for row in store.list_segments(session)})
        return index

    def close(self) -> None:
        """Let a running background merge finish, then release database connections."""
        try:
            self.wait_for_merges()
        finally:
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

    def _loaded(self) -> dict[str, SegmentSet]:
        """The segments of one committed state, loading those not loaded yet."""
        if self._sets is not None:
            return self._sets
        tried: set[int] = set()
        for _ in range(_LOAD_ATTEMPTS):
            manifest, rows, dead = self._db.snapshot()
            try:
                self._sets = self._read_sets(manifest, rows, dead)
                self._manifest = manifest
                return self._sets
            except FileNotFoundError as exc:
                if manifest.generation in tried:  # not a merge racing us: the files are gone
                    raise SeesayError(f"index {self.directory} is missing {exc.filename or exc}") from exc
                tried.add(manifest.generation)
        raise SeesayError(f"index {self.directory} kept changing while loading; try again")

    def _read_sets(self, manifest: Manifest, rows: list[SegmentRow], dead: dict[int, list[int]]) -> dict[str, SegmentSet]:
        sets = {}
        for kind, name in SET_NAMES.items():
            loaded = []
            for row in (r for r in rows if r.kind == kind):
                if row.id not in self._segments:
                    self._segments[row.id] = load_segment(self.directory, name, row, manifest.factory, manifest.dim)
                    self._segments[row.id].set_params(self._params)
                loaded.append(Loaded(row, self._segments[row.id], np.sort(np.array(dead.get(row.id, []), dtype=np.int64))))
            sets[kind] = SegmentSet(name, manifest.factory, manifest.dim, loaded, dict(self._params))
        current = {row.id for row in rows}
        self._segments = {i: v for i, v in self._segments.items() if i in current}
        return sets

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
        """The committed state this object reads (one more at every commit); it moves on `refresh()`."""
        return self._manifest.generation

    def load(self) -> "Index":
        """Load the committed state's segments now rather than at the first search; returns self.

        A loaded read-only index that is never refreshed is an immutable snapshot that
        threads may search at once.
        """
        self._loaded()
        return self

    def _set(self, kind: str) -> SegmentSet:
        if kind not in SET_NAMES:
            raise SeesayError(f"unknown item kind {kind!r}: use 'image' or 'caption'")
        return self._loaded()[kind]

    def search(self, kind: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) among items of `kind` ("image" or "caption"), each (nq, k).

        Rows are padded with id -1 and score -inf when fewer than k items exist.
        """
        segment_set = self._set(kind)
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self._manifest.dim:
            raise IndexMismatchError(
                f"query vectors have shape {queries.shape}; index {self.directory} holds dim {self._manifest.dim}"
            )
        if k < 1:
            raise SeesayError(f"k must be at least 1, got {k}")
        return segment_set.search(queries, k)

    def training_shortfall(self) -> dict[str, int]:
        """For each kind whose FAISS index still waits for training data, how many more vectors it needs.

        Until then that kind is searched by an exact scan of its stored vectors.
        """
        return {kind: s.untrained for kind, s in self._loaded().items() if s.untrained}

    def set_search_params(self, **params: int) -> None:
        """Override FAISS search parameters (e.g. nprobe=64, efSearch=256) for this session."""
        sets = self._loaded()
        known = set().union(*(s.tunable for s in sets.values()))
        unknown = sorted(set(params) - known)
        if unknown:
            raise SeesayError(
                f"search parameter(s) {', '.join(unknown)} do not apply to FAISS index "
                f"{self._manifest.factory!r} (it takes: {', '.join(sorted(known)) or 'none'})"
            )
        self._params = {**self._params, **params}
        for segment_set in sets.values():
            segment_set.set_params(self._params)

    def items(self, ids: Sequence[int]) -> list[Item]:
        """Items by id, in the order given; an error names ids that are not in the index."""
        ids = [int(i) for i in ids]
        return self._in_order(ids, self._db.items(ids))

    def items_and_captions(self, ids: Sequence[int]) -> tuple[list[Item], dict[int, list[Item]]]:
        """`items(ids)` and `captions_by_image(ids)` read together, in one query: a search's hits."""
        ids = [int(i) for i in ids]
        found, captions = self._db.items_and_captions(ids)
        return self._in_order(ids, found), captions

    def _in_order(self, ids: list[int], found: dict[int, Item]) -> list[Item]:
        """`found[i]` for each of `ids`; an error names ids that are not in the index."""
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
        for _ in range(_LOAD_ATTEMPTS):
            with self._db.session() as session:
                try:
                    return self._find(session, store.list_segments(session), kind, hashes)
                except FileNotFoundError:  # a merge retired a segment after the listing: list again
                    continue
        raise SeesayError(f"index {self.directory} kept changing while looking up hashes; try again")

    def _find(self, session: Session, segments: Sequence[SegmentRow], kind: str, hashes: Sequence[str]) -> dict[str, int]:
        """Ids of items of `kind` in `segments` whose hash is among `hashes`: the segments' key
        tables give candidates, which the rows' stored hashes (read by id through `session`) confirm."""
        wanted = list(set(hashes))
        if not wanted:
            return {}
        mine = [row for row in segments if row.kind == kind]
        self._keys = {row.id: self._keys[row.id] for row in segments if row.id in self._keys}
        for row in mine:
            if row.id not in self._keys:
                self._keys[row.id] = read_keys(self.directory, SET_NAMES[row.kind], row.id)
        positions, ids = hash_keys.candidates([self._keys[row.id] for row in mine], hash_keys.keys_of(wanted))
        if not len(ids):
            return {}
        stored = store.hashes_by_id(session, kind, ids.tolist())
        found: dict[str, int] = {}
        for position, item_id in zip(positions.tolist(), ids.tolist()):
            if stored.get(item_id) == wanted[position]:
                found[wanted[position]] = item_id
        return found

    def vectors(self, kind: str, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors of items of `kind`, by id, as an (n, dim) float32 array."""
        return self._set(kind).lookup(ids)

    def all_vectors(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Every stored (ids, vectors) of `kind` in the loaded state, in search order."""
        return self._set(kind).all()

    def info(self) -> IndexInfo:
        """Manifest, counts, segments, current files and database of this index."""
        manifest, rows, dead = self._db.snapshot()
        files = {
            path.name: path.stat().st_size
            for row in rows
            for path in segment_paths(self.directory, SET_NAMES[row.kind], row.id)
            if path.exists()
        }
        return IndexInfo(
            directory=str(self.directory),
            format_version=self.format_version,
            db_url=self._db.display_url,
            encoder=EncoderInfo(kind=manifest.encoder_kind, spec=manifest.encoder_spec, version=manifest.encoder_version),
            dim=manifest.dim,
            metric=manifest.metric,
            factory=manifest.factory,
            generation=manifest.generation,
            n_images=manifest.n_images,
            n_captions=manifest.n_captions,
            segments={kind: sum(1 for r in rows if r.kind == kind) for kind in SET_NAMES},
            tombstones=sum(len(ids) for ids in dead.values()),
            created_at=manifest.created_at.isoformat(),
            updated_at=manifest.updated_at.isoformat(),
            files=files,
            search_params=dict(self._params),
            read_only=self.read_only,
        )

    def verify(self, deep: bool = False) -> list[str]:
        """Problems of the committed state, one line each naming the file; [] for a sound index.

        Always: every committed segment's files are there, hold as many rows as recorded,
        in the index's dimension, and the segments' rows less their tombstones are as many
        as SQL has items of each kind and as the manifest counts. `deep` also reads each
        FAISS part and checks its count, each hash key table against the rows' stored
        hashes, that the live stored ids are exactly SQL's ids and that no caption points
        at a missing image. A commit meanwhile (a merge retiring the files just listed, in
        this process's background or another's) makes it look again.
        """
        for _ in range(_LOAD_ATTEMPTS):
            generation, problems = self._verify_state(deep)
            if not problems or self._db.manifest().generation == generation:
                return problems
        return problems

    def _verify_state(self, deep: bool) -> tuple[int, list[str]]:
        """`verify` of one committed state: (its generation, the problems found)."""
        problems: list[str] = []
        manifest, rows, dead = self._db.snapshot()
        with self._db.session() as session:
            counts = {kind: store.count(session, kind) for kind in SET_NAMES}
            sql_ids = {kind: store.ids_of(session, kind) for kind in SET_NAMES} if deep else {}
            dangling = store.dangling_captions(session) if deep else 0
        recorded = {"image": manifest.n_images, "caption": manifest.n_captions}
        for kind, name in SET_NAMES.items():
            held, live_ids = 0, []
            for row in (r for r in rows if r.kind == kind):
                vectors_path, ids_path, part_path, keys_path = segment_paths(self.directory, name, row.id)
                wanted = (vectors_path, ids_path, keys_path, *([part_path] if row.part else []))
                missing = [path for path in wanted if not path.is_file()]
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
                if not len(vectors) == len(ids) == row.rows:
                    problems.append(f"{name}.s{row.id}: {len(vectors)} vectors and {len(ids)} ids, but the segment records {row.rows}")
                gone = dead.get(row.id, [])
                held += row.rows - len(gone)
                if deep:
                    live = np.asarray(ids)[~np.isin(ids, gone)]
                    live_ids += live.tolist()
                    problems += self._verify_keys(keys_path, kind, live)
                    if row.part:
                        problems += self._verify_part(part_path, len(ids))
            if not held == counts[kind] == recorded[kind]:
                problems.append(
                    f"{name}: {held} vectors in segments (less deleted ones), but SQL holds {counts[kind]} {kind}s "
                    f"and the manifest counts {recorded[kind]}"
                )
            if deep and sorted(live_ids) != sql_ids[kind]:
                problems.append(f"{name}: the stored {kind} ids differ from SQL's")
        if dangling:
            problems.append(f"{self._db.display_url}: {dangling} captions point at no image")
        return manifest.generation, problems

    def _verify_keys(self, keys_path: Path, kind: str, live: np.ndarray) -> list[str]:
        """Whether a segment's hash key table holds each of its live rows under the key of the row's stored hash."""
        try:
            table = read_or_fail(lambda path: np.load(path, mmap_mode="r"), keys_path)
        except SeesayError as exc:
            return [str(exc)]
        if table.ndim != 2 or table.shape[0] != 2 or table.dtype != np.int64:
            return [f"{keys_path} holds an array of shape {table.shape} ({table.dtype}), not (2, n) int64"]
        with self._db.session() as session:
            stored = store.hashes_by_id(session, kind, live.tolist())
        expected = hash_keys.table(hash_keys.keys_of([stored.get(i, "") for i in live.tolist()]), live)
        if not np.array_equal(hash_keys.merged([(table, np.setdiff1d(table[1], live))]), expected):
            return [f"{keys_path} does not hold the content hashes of its segment's rows"]
        return []

    def _verify_part(self, part_path: Path, rows: int) -> list[str]:
        try:
            index = read_or_fail(lambda path: faiss.read_index(str(path)), part_path)
        except SeesayError as exc:
            return [str(exc)]
        problems = []
        if index.d != self._manifest.dim:
            problems.append(f"{part_path} holds dimension {index.d}, not {self._manifest.dim}")
        if index.is_trained and index.ntotal != rows:
            problems.append(f"{part_path} holds {index.ntotal} vectors, the ids file {rows}")
        return problems

    # ----- writing -----

    def check_writable(self, action: str) -> None:
        """SeesayError when the index is open read-only."""
        if self.read_only:
            raise SeesayError(f"index {self.directory} is open read-only: cannot {action}")

    @contextmanager
    def _writing(self, action: str) -> Iterator[tuple[Session, Manifest, list[SegmentRow]]]:
        """A locked transaction over the latest state, committed as the next generation.

        Yields (session, manifest, committed segments); the body writes new segment
        files and records them through the session.
        """
        self.check_writable(action)
        self._retired, self._recorded = set(), []
        with self._db.writing() as (session, manifest):
            rows = store.list_segments(session)
            remove_segments(self.directory, keep={row.id for row in rows})  # a crashed writer's files
            self._ids = {i: ids for i, ids in self._ids.items() if i in {row.id for row in rows}}
            yield session, manifest, rows
            manifest.generation += 1
            manifest.updated_at = store.utcnow()
        self._manifest = manifest
        self._sets = None  # the next read loads the new state; unchanged segments stay loaded
        remove_segments(self.directory, drop=self._retired)  # readers that still load them retry
        self._ids = {i: ids for i, ids in self._ids.items() if i not in self._retired}

    def reserve_ids(self, n: int) -> list[int]:
        """`n` fresh item ids, taken from the database's counter now: no other add will get them.

        For writers that number their rows before they have the vectors (a distributed
        job, whose retried batches must recompute the same ids); they pass them to
        `add_vectors(..., ids=...)` later. Ids reserved and never used stay unused. The counter
        is the manifest's (`Manifest.next_id`), so this works alike on every database.
        """
        self.check_writable("reserve ids")
        if n < 0:
            raise SeesayError(f"cannot reserve {n} ids")
        with self._db.writing() as (_session, manifest):
            return store.take_ids(manifest, n)

    def add_vectors(self, rows: Sequence[NewItem], vectors: np.ndarray, ids: Sequence[int] | None = None) -> Added:
        """Store rows with their vectors (one per row) in one transaction; returns the ids they got.

        Rows whose hash is already indexed are skipped, and so are captions whose image is
        neither indexed nor among `rows` (deleted meanwhile by another writer). The vectors
        go into one new segment per kind; then a background thread merges segments as the
        policy says (`compaction`), off the write lock: the next add does not wait for it.
        `ids`, one per row, are ids this index gave out by `reserve_ids` (else the add
        reserves its own); they must ascend within each kind, and one never reserved, or
        held by an item or a deleted item's tombstone, is an error naming it.
        """
        self.check_writable("add")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(rows), self._manifest.dim):
            raise IndexMismatchError(
                f"{len(rows)} rows came with vectors of shape {vectors.shape}; "
                f"index {self.directory} holds dim {self._manifest.dim}"
            )
        given = None if ids is None else np.asarray(ids, dtype=np.int64)
        if given is not None:
            _check_given_ids(rows, given, self.directory)
        if not np.isfinite(vectors).all():
            raise SeesayError(f"vectors for index {self.directory} contain NaN or infinity; nothing added")
        added = Added(ids=[None] * len(rows))
        if not rows:
            return added
        with self._writing("add") as (session, manifest, segments):
            # Hashes are looked up in the segments committed before this transaction took the
            # write lock, and in this add's own rows: no other writer adds meanwhile.
            images = [i for i, row in enumerate(rows) if row.kind == "image"]
            indexed = self._find(session, segments, "image", [rows[i].hash for i in images])
            fresh = self._fresh(rows, images, indexed, added)
            image_ids = self._insert(session, manifest, rows, fresh, added, [None] * len(fresh), given)
            self._append(session, manifest, segments, "image", _take(vectors, fresh), image_ids, [rows[i].hash for i in fresh])
            captions = [i for i, row in enumerate(rows) if row.kind == "caption"]
            owners = {rows[i].hash: int(item_id) for i, item_id in zip(fresh, image_ids)}
            owners.update(self._find(session, segments, "image", [h for i in captions if (h := rows[i].image_hash) is not None and h not in owners]))
            indexed = self._find(session, segments, "caption", [rows[i].hash for i in captions])
            fresh = self._fresh(rows, captions, indexed, added)
            added.orphaned = [i for i in fresh if rows[i].image_hash not in owners]
            fresh = [i for i in fresh if rows[i].image_hash in owners]
            caption_ids = self._insert(session, manifest, rows, fresh, added, [owners[rows[i].image_hash] for i in fresh], given)
            self._append(session, manifest, segments, "caption", _take(vectors, fresh), caption_ids, [rows[i].hash for i in fresh])
            manifest.n_images += len(image_ids)
            manifest.n_captions += len(caption_ids)
        # The committed segments are known here: start the merge thread only when the policy
        # has work (most commits leave it none, and a look costs a snapshot of the database).
        if compaction.plan([row for row in segments if row.id not in self._retired] + self._recorded):
            self._merger.kick()
        return added

    def _insert(
        self,
        session: Session,
        manifest: Manifest,
        rows: Sequence[NewItem],
        positions: list[int],
        added: Added,
        image_item_ids: list[int | None],
        given: np.ndarray | None = None,
    ) -> np.ndarray:
        """Insert the rows at `positions` (pointing at `image_item_ids`, one per position) under their `given`
        ids, else ids taken from the manifest's counter; returns the ids."""
        if not positions:
            return np.zeros(0, dtype=np.int64)
        if given is None:
            ids = store.take_ids(manifest, len(positions))
        else:
            ids = given[positions].tolist()
            self._check_unused(session, manifest, ids)
        chosen = [rows[i] for i in positions]
        columns = {
            "id": ids,
            "kind": [row.kind for row in chosen],
            "source_id": [row.source_id for row in chosen],
            "path": [row.path for row in chosen],
            "text": [row.text for row in chosen],
            "image_item_id": image_item_ids,
            "split": [row.split for row in chosen],
            "hash": [row.hash for row in chosen],
            "created_at": [store.utcnow()] * len(chosen),
        }
        store.insert_items(session, columns)
        for i, item_id in zip(positions, ids):
            added.ids[i] = item_id
        return np.array(ids, dtype=np.int64)

    def _check_unused(self, session: Session, manifest: Manifest, ids: list[int]) -> None:
        """SeesayError naming the given `ids` that `reserve_ids` never gave, or that an item or a
        tombstone holds: storing them would give an id twice."""
        unreserved = [i for i in ids if i >= manifest.next_id]
        if unreserved:
            raise SeesayError(f"item ids {unreserved} were never reserved from index {self.directory} (reserve_ids gives them); nothing added")
        taken = store.held(session, ids)
        if taken:
            raise SeesayError(f"item ids {taken} of index {self.directory} are already given to other items (or deleted ones); nothing added")

    @staticmethod
    def _fresh(rows: Sequence[NewItem], positions: list[int], indexed: dict[str, int], added: Added) -> list[int]:
        """Positions whose hash is neither indexed nor repeated earlier; the rest are marked existing."""
        hashes = [rows[i].hash for i in positions]
        if len(set(hashes)) == len(hashes) and indexed.keys().isdisjoint(hashes):  # the usual case, at C speed
            return list(positions)
        seen = set(indexed)
        fresh = []
        for i in positions:
            if rows[i].hash in seen:
                added.existing.append(i)
            else:
                seen.add(rows[i].hash)
                fresh.append(i)
        return fresh

    def _append(
        self,
        session: Session,
        manifest: Manifest,
        segments: list[SegmentRow],
        kind: str,
        vectors: np.ndarray,
        ids: np.ndarray,
        hashes: Sequence[str],
    ) -> None:
        """Write `vectors` (rows already inserted under `ids`, with content `hashes`) as a new segment of `kind`.

        A type that needs training is trained by the commit that first brings enough
        vectors, on all of them, and that commit merges them all into its one segment.
        """
        if not len(ids):
            return
        name = SET_NAMES[kind]
        mine = [row for row in segments if row.kind == kind]
        fresh = build(manifest.dim, manifest.factory)
        template = None
        retired: list[SegmentRow] = []
        keys = hash_keys.table(hash_keys.keys_of(hashes), ids)
        if not fresh.is_trained:
            template = read_template(self.directory, name, mine)
            if template is None and sum(r.rows - r.dead for r in mine) + len(ids) >= training_need(fresh):
                old_ids, old_vectors, old_keys = self._live(session, name, mine)
                keys = hash_keys.merged([(old_keys, []), (keys, [])])
                ids, vectors = np.concatenate([old_ids, ids]), np.concatenate([old_vectors, vectors])
                if (np.diff(ids) < 0).any():  # ids reserved before others' adds come below theirs
                    order = np.argsort(ids, kind="stable")
                    ids, vectors = ids[order], vectors[order]
                template = _trained(fresh, vectors, manifest.factory, name)
                retired = mine
        part = make_part(manifest.factory, manifest.dim, vectors, ids, template) if template is not None or fresh.is_trained else None
        self._record(session, manifest, kind, vectors, ids, part, keys, retired)

    def _record(
        self,
        session: Session,
        manifest: Manifest,
        kind: str,
        vectors: np.ndarray,
        ids: np.ndarray,
        part,
        keys: np.ndarray,
        retired: list[SegmentRow],
    ) -> None:
        """Write a segment's files (`keys`: its hash key table) and record it in place of `retired` (whose files go after the commit)."""
        store.retire_segments(session, [row.id for row in retired])
        self._retired.update(row.id for row in retired)
        if len(ids):
            segment_id = manifest.next_segment
            manifest.next_segment += 1
            write_segment(self.directory, SET_NAMES[kind], segment_id, vectors, ids, part, keys)
            row = SegmentRow(id=segment_id, kind=kind, rows=len(ids), dead=0, first_id=int(ids[0]), part=part is not None)
            session.add(row)
            self._recorded.append(row)

    def _live(self, session: Session, name: str, rows: list[SegmentRow]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (ids, vectors) of `rows` that are not tombstoned, by ascending id, and their hash key table."""
        dead = store.tombstones(session, [row.id for row in rows])
        ids, vectors = [], []
        keys = hash_keys.merged((read_keys(self.directory, name, row.id), dead.get(row.id, [])) for row in rows)
        for row in rows:
            segment_ids, segment_vectors = read_ids(self.directory, name, row.id), read_vectors(self.directory, name, row.id)
            keep = ~np.isin(segment_ids, dead.get(row.id, []))
            ids.append(segment_ids[keep])
            vectors.append(np.asarray(segment_vectors[keep]))
        if not ids:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self._manifest.dim), dtype=np.float32), keys
        ids_all, vectors_all = np.concatenate(ids), np.concatenate(vectors)
        if (np.diff(ids_all) > 0).all():  # the usual case: no copy
            return ids_all, vectors_all, keys
        order = np.argsort(ids_all, kind="stable")
        return ids_all[order], vectors_all[order], keys

    def delete(self, ids: Sequence[int]) -> int:
        """Delete items by id (an image takes its captions along); returns how many went.

        Their rows go at once; their vectors stay in their segments as tombstones, which
        searches skip, until a merge rewrites those segments: a segment this delete leaves
        at least `compaction.DEAD_FRACTION` deleted is rewritten at once, in the background
        (searches ask each segment for k plus its tombstones), others by later merges or
        `compact`. Unknown ids are an error naming them, and then nothing is deleted.
        """
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        with self._writing("delete") as (session, manifest, segments):
            rows = store.rows_by_id(session, ids)
            unknown = sorted(set(ids) - {row.id for row in rows})
            if unknown:
                raise SeesayError(f"no items with ids {unknown} in index {self.directory}; nothing deleted")
            images = [row.id for row in rows if row.kind == "image"]
            captions = {row.id for row in rows if row.kind == "caption"}
            captions.update(store.caption_ids_of(session, images))
            twice = store.tombstoned(session, images + sorted(captions))
            if twice:
                raise SeesayError(
                    f"items {twice} of index {self.directory} have ids that an older seesay also gave to deleted items "
                    f"whose vectors are still stored: run `seesay compact --index {self.directory}`, then delete again; nothing deleted"
                )
            store.delete_ids(session, images + sorted(captions))
            gone = np.array(images + sorted(captions), dtype=np.int64)
            dead = {row.id: gone[np.isin(gone, self._segment_ids(row))].tolist() for row in segments}
            store.add_tombstones(session, dead)
            manifest.n_images -= len(images)
            manifest.n_captions -= len(captions)
        now = [SegmentRow(id=r.id, kind=r.kind, rows=r.rows, dead=r.dead + len(dead[r.id]), first_id=r.first_id, part=r.part) for r in segments]
        if compaction.plan(now):
            self._merger.kick()
        return len(images) + len(captions)

    def _segment_ids(self, row: SegmentRow) -> np.ndarray:
        if row.id not in self._ids:
            self._ids[row.id] = read_ids(self.directory, SET_NAMES[row.kind], row.id)
        return self._ids[row.id]

    def wait_for_merges(self) -> None:
        """Block until the background merges this object started are done (a failed one is raised here)."""
        if self._merger is not None:
            self._merger.wait()

    def compact(self, everything: bool = False) -> int:
        """Merge segments now: by the size-tiered policy (`indexer.compaction`, which every add
        also starts in the background), or all of a kind into one, dropping every deleted row (`everything`).

        Readers are never blocked and writers only for the moment a merged segment is swapped
        in: they keep the segments they loaded, and the next state they load has the merged
        one. Returns how many segments were merged away.
        """
        self.check_writable("compact")
        self.wait_for_merges()
        merged = 0
        if everything:
            with merge_lock(self.directory, wait=True):
                _, segments, dead = self._db.snapshot()
                for group in compaction.plan(segments, everything=True):
                    merged += self._merge(group, dead)
            return merged
        while (done := self._merge_next(wait=True)) is not None:
            merged += done
        return merged

    def _merge_next(self, wait: bool) -> int | None:
        """Run the policy's first merge: segments merged away (0 if the group changed meanwhile),
        or None when there is none to run (or, without `wait`, another process is merging)."""
        with merge_lock(self.directory, wait) as held:
            if not held:
                return None
            remove_dead_staging(self.directory)
            _, segments, dead = self._db.snapshot()
            groups = compaction.plan(segments)
            return self._merge(groups[0], dead) if groups else None

    def _merge(self, group: list[SegmentRow], dead: dict[int, list[int]]) -> int:
        """Write the live rows of `group` (segments of one kind; `dead`: their tombstones when
        planned) as one segment in a staging folder, without a lock, then swap it in (`_swap`).
        Returns how many segments were merged away: 0 if another writer retired one meanwhile."""
        kind = group[0].kind
        name = SET_NAMES[kind]
        fresh = build(self._manifest.dim, self._manifest.factory)
        try:
            sources = []
            for row in group:
                ids = read_ids(self.directory, name, row.id)
                part = segment_paths(self.directory, name, row.id)[2] if row.part else None
                live = ~np.isin(ids, dead.get(row.id, []))
                sources.append(Source(ids, read_vectors(self.directory, name, row.id), live, read_keys(self.directory, name, row.id), part))
            template = None
            if not is_flat(fresh) and all(row.part for row in group):
                template = fresh if fresh.is_trained else read_template(self.directory, name, group)
        except FileNotFoundError:  # a writer retired one of them after the plan
            return 0
        live = [s.ids[s.live] for s in sources]
        if any(len(a) and len(b) and a[-1] >= b[0] for a, b in zip(live, live[1:])):  # ranges interleave: sort in memory
            ids = np.concatenate(live)
            order = np.argsort(ids, kind="stable")
            vectors = np.concatenate([np.asarray(s.vectors)[s.live] for s in sources])[order]
            keys = hash_keys.merged((s.keys, s.ids[~s.live]) for s in sources)
            sources = [Source(ids[order], vectors, np.ones(len(ids), dtype=bool), keys)]
        rows = sum(int(s.live.sum()) for s in sources)
        with staging(self.directory) as folder:
            if rows:
                write_merged(folder, name, 0, sources, template)
            return self._swap(group, dead, folder, name, rows, template is not None)

    def _swap(self, group: list[SegmentRow], dead: dict[int, list[int]], folder: Path, name: str, rows: int, part: bool) -> int:
        """In one short locked transaction: if `group` is still committed, retire it and record the
        merged segment from `folder` (0 of `name`), carrying over tombstones added since the plan."""
        with self._db.writing() as (session, manifest):
            if not {row.id for row in group} <= {row.id for row in store.list_segments(session)}:
                return 0
            known = {i for row in group for i in dead.get(row.id, [])}
            later = sorted({i for ids in store.tombstones(session, [row.id for row in group]).values() for i in ids} - known)
            store.retire_segments(session, [row.id for row in group])
            if rows:
                segment_id = manifest.next_segment
                manifest.next_segment += 1
                for staged, target in zip(segment_paths(folder, name, 0), segment_paths(self.directory, name, segment_id)):
                    if staged.exists():
                        os.replace(staged, target)  # uncommitted until the transaction is: garbage if it fails
                fsync_directory(self.directory)
                first_id = int(read_ids(self.directory, name, segment_id)[0])
                session.add(SegmentRow(id=segment_id, kind=group[0].kind, rows=rows, dead=0, first_id=first_id, part=part))
                session.flush()
                store.add_tombstones(session, {segment_id: later})
            manifest.generation += 1
            manifest.updated_at = store.utcnow()
        remove_segments(self.directory, drop={row.id for row in group})
        self._manifest = manifest
        self._sets = None  # the next read loads the merged state (readers elsewhere retry a removed file)
        return len(group)

    def set_paths(self, paths: dict[int, str]) -> None:
        """Point image items at new files ({item id: path}), e.g. after the files moved; vectors stay."""
        if not paths:
            return
        with self._writing("set paths") as (session, _manifest, _segments):
            rows = store.rows_by_id(session, paths)
            wrong = sorted(set(paths) - {row.id for row in rows if row.kind == "image"})
            if wrong:
                raise ItemNotFoundError(f"no image items with ids {wrong} in index {self.directory}; no path changed", wrong)
            store.set_paths(session, paths)


def _background_merge(index: Index) -> Callable[[], bool]:
    """The merger's step for `index`: run the policy's next merge; False when none is left.

    It holds the index weakly, so that an index nobody uses is freed at once (with its
    loaded segments) rather than by the cycle collector."""
    ref = weakref.ref(index)

    def step() -> bool:
        target = ref()
        return target is not None and target._merge_next(wait=False) is not None

    return step


def _trained(index, vectors: np.ndarray, factory: str, name: str):
    """`index` (empty) trained on `vectors`."""
    try:
        index.train(vectors)
    except RuntimeError as exc:
        raise SeesayError(
            f"FAISS index {factory!r} could not be trained on {len(vectors)} {name} vectors: {faiss_reason(exc)}"
        ) from exc
    return index


def _take(vectors: np.ndarray, positions: list[int]) -> np.ndarray:
    """The rows of `vectors` at `positions` (ascending): a view when they are one run, as in most adds."""
    if positions and positions[-1] - positions[0] == len(positions) - 1:
        return vectors[positions[0] : positions[-1] + 1]
    return vectors[positions]


def _check_given_ids(rows: Sequence[NewItem], ids: np.ndarray, directory: Path) -> None:
    """SeesayError unless there is one id per row, positive, ascending within each kind (FAISS segments keep ids sorted)."""
    if ids.shape != (len(rows),):
        raise SeesayError(f"{len(rows)} rows came with {ids.size} ids for index {directory}; nothing added")
    for kind in SET_NAMES:
        mine = ids[[i for i, row in enumerate(rows) if row.kind == kind]]
        if len(mine) and (mine[0] < 1 or (np.diff(mine) <= 0).any()):
            raise SeesayError(f"{kind} ids for index {directory} must be positive and ascending; nothing added")
