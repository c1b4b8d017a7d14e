"""Merges off the write path: a background thread per writable index, and the folders merges write in.

A merge reads committed, immutable segments and writes their live rows as one new segment
into a staging folder `DIR/.merging-PID-XXXX` without any lock, so commits and readers go
on meanwhile; then a short locked transaction swaps it in (see `Index._swap`). Files in a
staging folder match no segment name, so no writer mistakes them for a crashed commit's;
a folder whose process is gone (killed) is removed by the next writable open or merge.
One merge at a time runs per index directory across processes (`merge.lock`, flock).
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from indexer.errors import SeesayError

STAGING_PREFIX = ".merging-"
LOCK_FILE = "merge.lock"
log = logging.getLogger(__name__)


@contextmanager
def staging(directory: Path) -> Iterator[Path]:
    """A fresh staging folder for one merge, removed afterwards (what was swapped in has left it)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=directory))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_dead_staging(directory: Path) -> None:
    """Remove staging folders of merges whose process is gone."""
    for path in directory.glob(STAGING_PREFIX + "*"):
        pid = path.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def merge_lock(directory: Path, wait: bool) -> Iterator[bool]:
    """Hold the index's merge lock: yields True when held; without `wait`, False if another holds it."""
    with open(directory / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Merger:
    """Runs `merge_one` (one merge; False when there is nothing left to merge) in a background
    thread until it returns False, whenever `kick()` is called; one thread at a time."""

    def __init__(self, merge_one: Callable[[], bool], name: str) -> None:
        self._merge_one = merge_one
        self._name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending = False
        self._error: BaseException | None = None

    def kick(self) -> None:
        """Ask for merges; starts the thread if none runs (a running one looks again when done)."""
        with self._lock:
            self._pending = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"seesay-merge {self._name}")
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pending or self._error is not None:
                    self._thread = None
                    return
                self._pending = False
            try:
                while self._merge_one():
                    pass
            except BaseException as exc:  # kept for wait(): the committed segments stay as they were
                log.warning("background merge of %s failed: %s", self._name, exc)
                with self._lock:
                    self._error = exc

    def wait(self) -> None:
        """Block until no merge runs or is asked for; a background merge's failure is raised here, once."""
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                break
            thread.join()
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise SeesayError(f"a background merge of {self._name} failed (the index is as before it): {error}") from error
