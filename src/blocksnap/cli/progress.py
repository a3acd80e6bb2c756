"""A progress bar on a terminal, nothing when piped or with -q."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from .context import Settings


@contextlib.contextmanager
def progress_bar(settings: Settings, label: str) -> Iterator[Callable[[int, int], None] | None]:
    if not settings.show_progress:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
    # on stderr, the terminal we checked: stdout stays clean for results and --json
    with Progress("[bold]" + label, BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
