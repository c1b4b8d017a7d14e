"""What the CLI's log handler shows on stderr: seesay's records one line each, once, and still seen by caplog."""
from __future__ import annotations

import logging

import pytest

from cli.logs import HANDLER_NAME, SEESAY_LOGGERS, install_log_handler


@pytest.fixture
def install():
    """`install_log_handler`, undone after the test: the handler leaves the root logger, seesay's loggers get their levels back."""
    levels = {name: logging.getLogger(name).level for name in (*SEESAY_LOGGERS, "somelibrary")}
    yield install_log_handler
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_a_long_record_stays_one_line_when_stderr_is_not_a_terminal(install, capsys):
    install(logging.INFO)
    message = "skipped " + ", ".join(f"holiday/photo_{i:03d}.jpg" for i in range(30))  # about 700 characters
    logging.getLogger("retrieval.ingest").info(message)
    assert capsys.readouterr().err.splitlines() == [f"INFO     {message}"]  # as rich lays it out, unwrapped


def test_caplog_sees_seesay_records_and_stderr_shows_each_once(install, caplog, capsys):
    install(logging.INFO)
    install(logging.INFO)  # as every CLI invocation does, several in one process under typer's test runner
    logging.getLogger("indexer.index").warning("segment 3 is damaged")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("indexer.index", "segment 3 is damaged")]
    assert capsys.readouterr().err.splitlines() == ["WARNING  segment 3 is damaged"]


def test_other_libraries_show_their_warnings_but_not_their_chatter(install, capsys):
    install(logging.DEBUG)
    other = logging.getLogger("somelibrary")
    other.setLevel(logging.INFO)
    other.info("loading weights")
    other.warning("that option is deprecated")
    logging.getLogger("retrieval.cache").debug("cache hit")
    assert capsys.readouterr().err.splitlines() == ["WARNING  that option is deprecated", "DEBUG    cache hit"]
