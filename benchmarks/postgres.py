"""A throwaway PostgreSQL server for tests and benchmarks: initdb into a temporary folder, start it
on a free port of 127.0.0.1, hand out fresh databases, stop and delete it.

It uses the server binaries of the machine (Debian's `postgresql` package puts them in
/usr/lib/postgresql/VERSION/bin) and runs them as the `postgres` user when started as
root (the server refuses root). `available()` says why it cannot run, or None.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


def binaries() -> Path | None:
    """The folder holding initdb and pg_ctl, newest version first, or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]), reverse=True)
    return Path(candidates[0]).parent if candidates else None


def available() -> str | None:
    """Why no server can be started here, or None when one can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    if binaries() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run the server as"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _parent(proc: Path) -> int | None:
    """The parent process id of /proc/PID, or None if it has gone."""
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _run_seconds(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class TemporaryServer:
    """A PostgreSQL cluster in a temporary folder (trust authentication, loopback only)."""

    def __init__(self, durable: bool = False) -> None:
        """`durable`: keep fsync on (benchmarks); tests run without it."""
        reason = available()
        if reason:
            raise RuntimeError(reason)
        self.bin = binaries()
        self.folder = Path(tempfile.mkdtemp(prefix="seesay-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self._user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._user:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        options = f"-c listen_addresses=127.0.0.1 -c max_connections=300 -p {self.port} -k {self.folder}" + ("" if durable else " -F")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "server.log"), "-w", "start")

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run([*self._user, str(self.bin / program), *args], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{program} failed: {result.stderr.strip() or result.stdout.strip()}")

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of `database` on this server (no password: trust on loopback)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database and return its URL."""
        import psycopg

        name = f"seesay_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cpu_seconds(self) -> float:
        """CPU time the server's processes have used so far (postmaster, backends, WAL writer…),
        from /proc/PID/schedstat (nanoseconds); 0 where /proc has none. Only live processes
        count: take differences over a span in which the connections in use stay open."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
            pids = [postmaster] + [
                int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == postmaster
            ]
            return sum(_run_seconds(pid) for pid in pids)
        except (OSError, ValueError, IndexError):
            return 0.0

    def stop(self) -> None:
        """Stop the server at once and delete its folder."""
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "TemporaryServer":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
