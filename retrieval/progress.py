"""Rich progress bars for long loops, switched off cleanly when not wanted."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")

console = Console(stderr=True)


def new_progress(enabled: bool = True) -> Progress:
    """seesay's one progress style: bars on stderr (stdout belongs to results and --json); silent when not `enabled`."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, disable=not enabled)


@contextmanager
def progress_bar(total: int | None, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A bar on stderr while the block runs; yields `advance(n)` (a no-op when not `enabled`)."""
    if not enabled:
        yield lambda _n: None
        return
    with new_progress() as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


def track(items: Iterable[T], total: int | None, description: str, enabled: bool = True) -> Iterator[T]:
    """Yield `items` with a progress bar; a list item advances it by its length, anything else by 1."""
    with progress_bar(total, description, enabled) as advance:
        for item in items:
            yield item
            advance(len(item) if isinstance(item, list) else 1)
