"""Progress (rich, on stderr) for long work outside Lightning's loops: raw-dump parsing, k-core filtering,
AdaMerging steps. Lightning's RichProgressBar covers training and evaluation; downloads and the
SmolLM2 conversion have their own bars (download.py, backbone.py)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from rich.console import Console

CONSOLE = Console(stderr=True)  # tests swap it for a recording console


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=CONSOLE, transient=False)


def track(iterable: Iterable, description: str, total: int | None = None) -> Iterator:
    """Yield from ``iterable`` with a bar (``total``, or ``len(iterable)``; a running count without)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with _progress() as p:
        task = p.add_task(description, total=total)
        for x in iterable:
            yield x
            p.advance(task)


@contextmanager
def status(description: str, total: int | None = None):
    """A bar advanced by hand: ``with status("k-core") as step: step(1, "round 2: 1,234 users")``."""
    with _progress() as p:
        task = p.add_task(description, total=total)

        def step(n: int = 1, text: str | None = None) -> None:
            p.update(task, advance=n, description=f"{description}: {text}" if text else description)

        yield step
