"""A database password is used, never written: a real PostgreSQL server, started for these tests.

Skipped where the PostgreSQL server binaries or the psycopg driver are missing.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from cli.app import app
from conftest import solid_image

PASSWORD = "s3cret-Pa55word"
BINARIES = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
runner = CliRunner()

pytestmark = pytest.mark.skipif(not BINARIES, reason="PostgreSQL server binaries are not installed")


def _as_server_user(command: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server as `postgres` then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres():
    """(URL with the password, socket folder) of a throwaway server; stopped and removed afterwards."""
    pytest.importorskip("psycopg")
    root = Path(tempfile.mkdtemp(prefix="seesay-pg-"))
    os.chmod(root, 0o777)  # the server user writes here
    bin_dir = Path(BINARIES[-1])
    (root / "pw").write_text(PASSWORD)
    os.chmod(root / "pw", 0o644)
    data = root / "data"
    try:
        subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "seesay", "--auth=scram-sha-256",
                                        f"--pwfile={root / 'pw'}"]), check=True, capture_output=True, timeout=300)
        options = f"-k {root} -c listen_addresses=''"
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l",
                                        str(root / "log"), "start"]), check=True, capture_output=True, timeout=300)
        yield f"postgresql+psycopg://seesay:{PASSWORD}@/postgres?host={root}", root
    finally:
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_the_password_is_used_but_never_written(postgres, tmp_path, monkeypatch):
    url, socket_dir = postgres
    for name, rgb in {"red": (250, 0, 0), "blue": (0, 0, 250)}.items():
        solid_image(tmp_path / "photos" / f"{name}.png", rgb)
        (tmp_path / "photos" / f"{name}.txt").write_text(f"a {name} square")
    index = tmp_path / "idx"
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    made = invoke("index", "--encoder", "test-colour:8", "--data", tmp_path / "photos", "--index", index, "--db-url", url)
    assert made.exit_code == 0, f"{made.output}{made.exception!r}"

    recorded = make_url(json.loads((index / "index.json").read_text())["db_url"])
    assert (recorded.username, recorded.password, recorded.database) == ("seesay", None, "postgres")
    assert recorded.query["host"] == str(socket_dir)
    for path in index.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), f"{path} holds the password"

    refused = invoke("search", "--index", index, "red", "--json")
    assert refused.exit_code != 0
    assert "SEESAY_DB_PASSWORD" in str(refused.exception) and PASSWORD not in str(refused.exception)

    monkeypatch.setenv("SEESAY_DB_PASSWORD", PASSWORD)
    found = invoke("search", "--index", index, "red", "-k", "1", "--json")
    assert found.exit_code == 0, f"{found.output}{found.exception!r}"
    assert Path(json.loads(found.stdout)["hits"][0]["path"]).name == "red.png"
    info = invoke("info", "--index", index, "--json")
    assert PASSWORD not in info.stdout

    monkeypatch.delenv("SEESAY_DB_PASSWORD")
    again = invoke("index", "--encoder", "test-colour:8", "--data", tmp_path / "photos", "--index", index, "--db-url", url)
    assert again.exit_code == 0, f"{again.output}{again.exception!r}"  # the URL with its password opens it too
    (tmp_path / "pgpass").write_text(f"*:*:*:seesay:{PASSWORD}\n")
    os.chmod(tmp_path / "pgpass", 0o600)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "pgpass"))  # libpq's own password file
    assert invoke("search", "--index", index, "blue", "-k", "1", "--json").exit_code == 0
