"""Database URLs as an index records them: fixed when the index is made, and never holding a password.

A relative SQLite path is made absolute at creation, so the index opens from any working
directory. The URL written to index.json has no password; it comes back at open time from
$SEESAY_DB_PASSWORD, and for PostgreSQL libpq also reads PGPASSWORD and ~/.pgpass itself.
"""
from __future__ import annotations

import os

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from indexer.errors import SeesayError

PASSWORD_ENV = "SEESAY_DB_PASSWORD"


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise SeesayError(f"cannot use that database URL: {exc}") from exc


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def resolved(url: str) -> str:
    """`url` with a relative SQLite file path made absolute against the working directory."""
    parsed = _parse(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return url
    if os.path.isabs(database):
        return url
    return _render(parsed.set(database=os.path.abspath(database)))


def without_password(url: str) -> str:
    """`url` as it may be written to disk: any password removed."""
    parsed = _parse(url)
    if parsed.password is None:
        return url
    # URL.set(password=None) would keep the password: None there means "unchanged".
    bare = URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database, parsed.query)
    return _render(bare)


def with_password(url: str) -> str:
    """A recorded `url` with the password from $SEESAY_DB_PASSWORD, when it names a user and the variable is set."""
    parsed = _parse(url)
    secret = os.environ.get(PASSWORD_ENV)
    if parsed.username is None or parsed.password is not None or not secret:
        return url
    return _render(parsed.set(password=secret))


def password_hint(url: str) -> str:
    """What to tell someone whose database refused a recorded URL: where its password can come from."""
    parsed = _parse(url)
    if parsed.username is None or parsed.password is not None or parsed.get_backend_name() == "sqlite":
        return ""
    where = f"${PASSWORD_ENV}"
    if parsed.get_backend_name() == "postgresql":
        where += ", PGPASSWORD or ~/.pgpass"
    return f" (the index keeps no database password: give it in {where})"
