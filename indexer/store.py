"""The index's metadata database: items, segments, tombstones and the one-row manifest, via SQLAlchemy 2.0.

Writers serialise on the manifest row: `Store.writing()` opens one transaction whose
first statement is a no-op UPDATE of that row, which takes SQLite's write lock (or a
row lock elsewhere) before anything is read, so a writer always sees the latest
committed generation. Item ids come from the manifest's `next_id` counter under that
lock, the same on every database: no id is given twice, deleted or reserved ones included.
"""
from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterable, Iterator, Sequence

from sqlalchemy import (
    CheckConstraint,
    Engine,
    ForeignKey,
    Boolean,
    Integer,
    String,
    Text,
    Index,
    create_engine,
    delete,
    event,
    func,
    or_,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker, undefer

from indexer.db_url import password_hint
from indexer.errors import IndexExistsError, SeesayError
from indexer.items import Item

KINDS = ("image", "caption")
MANIFEST_ID = 1
SQLITE_BUSY_TIMEOUT_S = 600
# Keep IN (...) lists well under every backend's bound-parameter limit.
_IN_CHUNK = 500


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class ItemRow(Base):
    """One image or caption; its id is its FAISS id."""

    __tablename__ = "items"
    __table_args__ = (
        # No index on (kind, hash): content hashes are random, and a B-tree over them takes each
        # commit's rows at random pages (6x the vectors' bytes written at 1M items on SQLite). Hashes
        # are looked up in the segments' key tables and kept unique by the writer (`Index.add_vectors`).
        CheckConstraint("kind IN ('image', 'caption')", name="item_kind"),
        # Only captions point at an image: images (NULL here) stay out of this index, which halves
        # its upkeep on adds; `image_item_id IN (...)` implies NOT NULL, so both databases use it.
        Index(
            "ix_items_image_item_id",
            "image_item_id",
            postgresql_where=text("image_item_id IS NOT NULL"),
            sqlite_where=text("image_item_id IS NOT NULL"),
        ),
        # Ids come from `Manifest.next_id`; AUTOINCREMENT stays so that an index made before it
        # keeps its counter (`indexer.migrate.migrate_v3` starts next_id past it).
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(8))
    source_id: Mapped[str] = mapped_column(String)  # nothing looks items up by it: no index to keep up
    path: Mapped[str | None] = mapped_column(String)
    text: Mapped[str | None] = mapped_column(Text)
    image_item_id: Mapped[int | None] = mapped_column(ForeignKey("items.id"))
    split: Mapped[str | None] = mapped_column(String(32))
    hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Manifest(Base):
    """The single row describing the index: encoder, FAISS factory and current generation."""

    __tablename__ = "manifest"

    id: Mapped[int] = mapped_column(primary_key=True, default=MANIFEST_ID)
    encoder_kind: Mapped[str] = mapped_column(String)
    encoder_spec: Mapped[str] = mapped_column(String)
    encoder_version: Mapped[int]
    dim: Mapped[int]
    metric: Mapped[str] = mapped_column(String(8), default="ip")
    factory: Mapped[str] = mapped_column(String, default="Flat")
    generation: Mapped[int] = mapped_column(default=0)
    next_segment: Mapped[int] = mapped_column(default=0)  # segment ids are never reused
    # The next item id to give (`take_ids`), on every database; 0 only in a format-3 index not
    # migrated yet. Deferred: only writers read it, so readers still open such an index.
    next_id: Mapped[int] = mapped_column(default=1, deferred=True)
    n_images: Mapped[int] = mapped_column(default=0)
    n_captions: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class SegmentRow(Base):
    """One committed, immutable segment: the vectors of one kind that one commit (or merge) wrote."""

    __tablename__ = "segments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(8), index=True)
    rows: Mapped[int]  # vectors in its files, deleted ones included
    dead: Mapped[int] = mapped_column(default=0)  # of those, how many are tombstoned
    first_id: Mapped[int]  # its smallest item id: segments are searched in this order
    part: Mapped[bool] = mapped_column(Boolean)  # whether it has a FAISS file beside its vectors


class Tombstone(Base):
    """A deleted item whose vector is still in a segment: searches skip it until a merge drops it."""

    __tablename__ = "tombstones"

    item_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    segment_id: Mapped[int] = mapped_column(Integer, index=True)


def _item(row: ItemRow) -> Item:
    added = row.created_at
    if added is not None and added.tzinfo is None:  # SQLite hands back naive datetimes; they are UTC
        added = added.replace(tzinfo=timezone.utc)
    return Item(row.id, row.kind, row.source_id, row.path, row.text, row.image_item_id, row.split, added)


def _chunks(values: Sequence, size: int = _IN_CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL mode, enforced foreign keys and a long busy wait.

    Only writers wait (WAL readers never block), and a writer may hold the lock while
    it writes a large generation's files.
    """
    if not url.startswith("sqlite"):
        return create_engine(url)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


class Store:
    """Sessions, schema and queries over one metadata database."""

    def __init__(self, url: str) -> None:
        try:
            self.engine = make_engine(url)
        except (SQLAlchemyError, ValueError) as exc:
            raise SeesayError(f"cannot use that database URL: {exc}") from exc
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._url = url

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()

    @property
    def display_url(self) -> str:
        """The database URL with any password masked."""
        return self.engine.url.render_as_string(hide_password=True)

    def initialise(self, manifest: Manifest) -> None:
        """Create the tables and insert `manifest`; refuse a database that already has one."""
        try:
            Base.metadata.create_all(self.engine)
            with self._sessions.begin() as session:
                if session.get(Manifest, MANIFEST_ID) is not None:
                    raise IndexExistsError(f"database {self.display_url} already holds a seesay index")
                session.add(manifest)
        except SQLAlchemyError as exc:
            raise SeesayError(f"cannot create the index tables in {self.display_url}: {exc}") from exc

    def drop(self) -> None:
        """Remove seesay's tables (what `initialise` made), as far as the database lets us."""
        try:
            Base.metadata.drop_all(self.engine)
        except SQLAlchemyError:
            pass  # best effort: the creation that failed reports its own error

    def session(self) -> Session:
        """A read session (use as a context manager) for the module's query helpers."""
        return self._sessions()

    def manifest(self) -> Manifest:
        """The committed manifest, detached; a clear error when this is no seesay database."""
        try:
            with self._sessions() as session:
                row = session.get(Manifest, MANIFEST_ID)
        except SQLAlchemyError as exc:
            raise SeesayError(
                f"database {self.display_url} holds no readable seesay index: {exc}{password_hint(self._url)}"
            ) from exc
        if row is None:
            raise SeesayError(f"database {self.display_url} holds no seesay index (empty manifest)")
        return row

    @contextmanager
    def writing(self) -> Iterator[tuple[Session, Manifest]]:
        """One locked write transaction: yields (session, manifest); commits on success."""
        with self._sessions.begin() as session:
            session.execute(
                update(Manifest)
                .where(Manifest.id == MANIFEST_ID)
                .values(generation=Manifest.generation)
            )
            manifest = session.get(Manifest, MANIFEST_ID, populate_existing=True, options=[undefer(Manifest.next_id)])
            yield session, manifest

    def items(self, ids: Sequence[int]) -> dict[int, Item]:
        """The items among `ids` that exist, by id."""
        with self._sessions() as session:
            return {row.id: _item(row) for row in rows_by_id(session, ids)}

    def captions_of(self, image_item_id: int) -> list[Item]:
        """Captions attached to an image item, in id order."""
        return self.captions_by_image([image_item_id]).get(image_item_id, [])

    def captions_by_image(self, image_item_ids: Sequence[int]) -> dict[int, list[Item]]:
        """Captions of many image items in one query per chunk of ids: {image id: captions in id order}."""
        found: dict[int, list[Item]] = {}
        with self._sessions() as session:
            for chunk in _chunks(sorted(set(image_item_ids))):
                # Only captions have an image_item_id; kind is checked here, not in SQL, where it
                # could steer the planner to an index on kind (format 2's (kind, hash) one walked
                # every caption: 20 ms instead of well under 1 ms at 100k captions).
                rows = session.scalars(select(ItemRow).where(ItemRow.image_item_id.in_(chunk)))
                for row in rows:
                    if row.kind == "caption":
                        found.setdefault(row.image_item_id, []).append(_item(row))
        for captions in found.values():
            captions.sort(key=lambda item: item.id)
        return found

    def items_and_captions(self, ids: Sequence[int]) -> tuple[dict[int, Item], dict[int, list[Item]]]:
        """`items(ids)` and `captions_by_image(ids)` in one query per chunk of ids: what a search's hits need."""
        found: dict[int, Item] = {}
        captions: dict[int, list[Item]] = {}
        with self._sessions() as session:
            for chunk in _chunks(sorted(set(int(i) for i in ids))):
                wanted = set(chunk)
                query = select(ItemRow).where(or_(ItemRow.id.in_(chunk), ItemRow.image_item_id.in_(chunk)))
                for row in session.scalars(query):
                    item = _item(row)
                    if row.id in wanted:
                        found[row.id] = item
                    if row.kind == "caption" and row.image_item_id in wanted:
                        captions.setdefault(row.image_item_id, []).append(item)
        for listed in captions.values():
            listed.sort(key=lambda item: item.id)
        return found, captions

    def snapshot(self, attempts: int = 20) -> tuple[Manifest, list[SegmentRow], dict[int, list[int]]]:
        """One committed state: (manifest, segments, tombstoned ids by segment).

        Read without a write lock: every commit bumps the generation, so a state read
        between two equal readings of it is one commit's whole state.
        """
        for _ in range(attempts):
            before = self.manifest()
            with self._sessions() as session:
                segments = list_segments(session)
                dead = tombstones(session)
            after = self.manifest()
            if after.generation == before.generation:
                return after, segments, dead
        raise SeesayError(f"database {self.display_url} kept changing while reading the index state; try again")

    def images_under(self, prefix: str | None) -> list[Item]:
        """Image items whose path starts with `prefix` (every image for None), in id order."""
        query = select(ItemRow).where(ItemRow.kind == "image")
        if prefix is not None:
            query = query.where(ItemRow.path.startswith(prefix, autoescape=True))
        with self._sessions() as session:
            return [_item(row) for row in session.scalars(query.order_by(ItemRow.id))]


def set_paths(session: Session, paths: dict[int, str]) -> None:
    """Point image items at new files: {item id: path}."""
    for item_id, path in paths.items():
        session.execute(update(ItemRow).where(ItemRow.id == item_id, ItemRow.kind == "image").values(path=path))


def hashes_by_id(session: Session, kind: str, ids: Sequence[int]) -> dict[int, str]:
    """The content hashes of the items of `kind` among `ids`, by id (primary-key look-ups)."""
    found: dict[int, str] = {}
    for chunk in _chunks(sorted(set(ids))):
        query = select(ItemRow.id, ItemRow.kind, ItemRow.hash).where(ItemRow.id.in_(chunk))
        found.update((item_id, item_hash) for item_id, item_kind, item_hash in session.execute(query) if item_kind == kind)
    return found


def rows_by_id(session: Session, ids: Iterable[int]) -> list[ItemRow]:
    """Rows whose id is in `ids` (missing ids are simply absent)."""
    rows: list[ItemRow] = []
    for chunk in _chunks(sorted(set(int(i) for i in ids))):
        rows.extend(session.scalars(select(ItemRow).where(ItemRow.id.in_(chunk))))
    return rows


def caption_ids_of(session: Session, image_ids: Sequence[int]) -> list[int]:
    """Ids of the captions attached to any of `image_ids`."""
    found: list[int] = []
    for chunk in _chunks(sorted(set(image_ids))):
        # Only captions have an image_item_id; see Store.captions_by_image for why kind is not filtered here.
        found.extend(session.scalars(select(ItemRow.id).where(ItemRow.image_item_id.in_(chunk))))
    return found


def delete_ids(session: Session, ids: Sequence[int]) -> None:
    """Delete items by id, captions first so no caption outlives its image mid-transaction."""
    # Look the kinds up by primary key, then delete by id per kind (no `kind = ?` filter, which
    # could steer the planner to an index on kind).
    kinds: dict[str, list[int]] = {"caption": [], "image": []}
    for chunk in _chunks(sorted(set(ids))):
        for item_id, kind in session.execute(select(ItemRow.id, ItemRow.kind).where(ItemRow.id.in_(chunk))):
            kinds[kind].append(item_id)
    for kind in ("caption", "image"):
        for chunk in _chunks(kinds[kind]):
            session.execute(delete(ItemRow).where(ItemRow.id.in_(chunk)))


def count(session: Session, kind: str) -> int:
    """Number of items of `kind` as seen by `session`."""
    return session.scalar(select(func.count()).select_from(ItemRow).where(ItemRow.kind == kind))


def ids_of(session: Session, kind: str) -> list[int]:
    """Every item id of `kind`, ascending."""
    return list(session.scalars(select(ItemRow.id).where(ItemRow.kind == kind).order_by(ItemRow.id)))


def dangling_captions(session: Session) -> int:
    """How many captions point at no image item."""
    images = select(ItemRow.id).where(ItemRow.kind == "image")
    return session.scalar(
        select(func.count())
        .select_from(ItemRow)
        .where(ItemRow.kind == "caption", or_(ItemRow.image_item_id.is_(None), ItemRow.image_item_id.not_in(images)))
    )


def list_segments(session: Session) -> list[SegmentRow]:
    """Every committed segment, detached from `session`, in search order (by first item id)."""
    rows = list(session.scalars(select(SegmentRow).order_by(SegmentRow.first_id, SegmentRow.id)))
    for row in rows:
        session.expunge(row)  # plain values from here on; changes go through statements
    return rows


def tombstones(session: Session, segment_ids: Sequence[int] | None = None) -> dict[int, list[int]]:
    """Tombstoned item ids by segment id (of `segment_ids` only, if given)."""
    query = select(Tombstone.segment_id, Tombstone.item_id)
    found: dict[int, list[int]] = {}
    chunks = [None] if segment_ids is None else _chunks(sorted(set(segment_ids)))
    for chunk in chunks:
        selected = query if chunk is None else query.where(Tombstone.segment_id.in_(chunk))
        for segment_id, item_id in session.execute(selected):
            found.setdefault(segment_id, []).append(item_id)
    return found


def add_tombstones(session: Session, by_segment: dict[int, Sequence[int]]) -> None:
    """Record deleted ids still held by segments, and count them on their segments."""
    for segment_id, ids in by_segment.items():
        if not ids:
            continue
        session.execute(insert(Tombstone), [{"item_id": int(i), "segment_id": segment_id} for i in ids])
        session.execute(update(SegmentRow).where(SegmentRow.id == segment_id).values(dead=SegmentRow.dead + len(ids)))


def retire_segments(session: Session, segment_ids: Sequence[int]) -> None:
    """Drop segments and their tombstones from the manifest (their files become garbage at commit)."""
    for chunk in _chunks(sorted(set(segment_ids))):
        session.execute(delete(Tombstone).where(Tombstone.segment_id.in_(chunk)))
        session.execute(delete(SegmentRow).where(SegmentRow.id.in_(chunk)))


def take_ids(manifest: Manifest, n: int) -> list[int]:
    """`n` fresh item ids from the manifest's counter, moved past them: the caller holds the
    manifest from `Store.writing()`, so the commit that gives them also records that they are
    given. The same on every database; deleted and reserved ids are never given again."""
    first = manifest.next_id
    manifest.next_id = first + n
    return list(range(first, first + n))


def first_unused_id(session: Session) -> int:
    """The smallest id above every id this database may have given: its items, its tombstones
    and its own counter (SQLite's AUTOINCREMENT, PostgreSQL's sequence), for `Manifest.next_id`
    in an index made before that column."""
    last = [session.scalar(select(func.max(ItemRow.id))), session.scalar(select(func.max(Tombstone.item_id)))]
    dialect = session.bind.dialect.name
    if dialect == "sqlite":
        last.append(session.execute(text("SELECT seq FROM sqlite_sequence WHERE name = 'items'")).scalar())
    elif dialect == "postgresql":
        sequence = session.scalar(text("SELECT pg_get_serial_sequence('items', 'id')"))
        if sequence:
            last.append(session.scalar(text(f"SELECT last_value FROM {sequence}")))
    return max((value for value in last if value is not None), default=0) + 1


def _present(session: Session, column, ids: Iterable[int]) -> list[int]:
    """Those of `ids` found in `column` (a primary key), ascending."""
    found: list[int] = []
    for chunk in _chunks(sorted(set(int(i) for i in ids))):
        found.extend(session.scalars(select(column).where(column.in_(chunk))))
    return sorted(found)


def tombstoned(session: Session, ids: Iterable[int]) -> list[int]:
    """Those of `ids` that are tombstoned: deleted, their vectors not yet dropped by a merge."""
    return _present(session, Tombstone.item_id, ids)


def held(session: Session, ids: Iterable[int]) -> list[int]:
    """Those of `ids` that an item or a tombstone holds."""
    ids = list(ids)
    return sorted(set(_present(session, ItemRow.id, ids)) | set(tombstoned(session, ids)))


def insert_items(session: Session, columns: dict[str, Sequence]) -> None:
    """Insert item rows (ids included) given column by column, all of one length, in bulk:
    one COPY on PostgreSQL, one executemany elsewhere."""
    n = len(next(iter(columns.values()), ()))
    if not n:
        return
    if session.bind.dialect.name == "postgresql":
        cursor = session.connection().connection.cursor()
        with cursor.copy(f"COPY items ({', '.join(columns)}) FROM STDIN") as copy:
            copy.write(_copy_text(list(columns.values())))
        return
    names = list(columns)
    session.execute(insert(ItemRow.__table__), [dict(zip(names, row)) for row in zip(*columns.values())])


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(columns: list[Sequence]) -> str:
    """COPY's text format for rows given column by column (each column escaped by one
    str.translate, then the rows joined): a few C-level passes instead of psycopg's
    write_row per row."""
    return "\n".join(map("\t".join, zip(*map(_copy_column, columns)))) + "\n"


def _copy_column(column: Sequence) -> list[str]:
    """One column's values as COPY text: None is NULL, datetimes go as naive UTC (the columns are
    timestamps without time zone, which seesay reads back as UTC), each distinct one formatted
    once (a commit stamps all its rows alike). The values are joined with NUL, which PostgreSQL
    text cannot hold, escaped at once and split again."""
    nulls = list(column).count(None)
    if nulls == len(column):
        return ["\\N"] * nulls
    present = [v for v in column if v is not None] if nulls else column
    if present and isinstance(present[0], datetime):  # a column holds one type
        stamps = {v: (v.astimezone(timezone.utc).replace(tzinfo=None) if v.tzinfo else v).isoformat(" ") for v in set(present)}
        present_text = list(map(stamps.__getitem__, present))
    else:
        present_text = list(map(str, present))
    escaped = "\x00".join(present_text).translate(_COPY_ESCAPES).split("\x00") if present_text else []
    if len(escaped) != len(present_text):
        raise SeesayError("text with a NUL character cannot be stored in PostgreSQL")
    if not nulls:
        return escaped
    rest = iter(escaped)
    return ["\\N" if v is None else next(rest) for v in column]
