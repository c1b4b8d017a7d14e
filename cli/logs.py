"""What the CLI shows on stderr besides its own messages: seesay's log records, other libraries' warnings, no chatter."""
from __future__ import annotations

import logging
import os
import sys

# What the model libraries print by default: weight-loading and download progress bars,
# advisory warnings, the tokenizers' fork notice. None of it is the command's output, so
# it stays off stderr; setting these variables yourself brings it back.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
QUIET_LOGGERS = ("sentence_transformers", "huggingface_hub", "open_clip", "timm")

# seesay's own loggers: every library module logs through logging.getLogger(__name__).
SEESAY_LOGGERS = ("retrieval", "indexer", "benchmarks", "cli", "seesay")
HANDLER_NAME = "seesay"


def quiet_libraries() -> None:
    """Keep third-party chatter off stderr (before the libraries are imported, which happens lazily)."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def install_log_handler(level: int = logging.INFO) -> None:
    """Show seesay's log records at `level` and above, and other libraries' warnings, on stderr
    (stdout stays the command's own, --json).

    One handler, on the root logger: records keep propagating, so whatever else listens there
    (pytest's caplog, a host program's handler) sees them, and each reaches stderr once. On a
    terminal it is rich's; elsewhere (CI logs, pipes, files) one plain line per record, never
    wrapped at a guessed width. Installing again replaces it.
    """
    from cli.common import err

    if err.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
    else:
        handler = LineHandler()
    handler.set_name(HANDLER_NAME)
    handler.addFilter(_shown)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    for name in SEESAY_LOGGERS:
        logging.getLogger(name).setLevel(level)


def _shown(record: logging.LogRecord) -> bool:
    """seesay's records (their loggers' levels chose them) and everyone else's warnings and errors."""
    return record.name.partition(".")[0] in SEESAY_LOGGERS or record.levelno >= logging.WARNING


class LineHandler(logging.Handler):
    """One plain line a record, "LEVEL    message" as rich lays it out, on whatever sys.stderr is at the time."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)
