"""Progress bars for long jobs: rich on stderr, with images per second."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _ImagesPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        rate = task.completed / task.elapsed if task.elapsed else 0.0
        return Text(f"{rate:.1f} img/s", style="cyan")


@contextlib.contextmanager
def progress_bar(
    total: int, label: str, *, enabled: bool = True
) -> Iterator[Callable[[int], None] | None]:
    """Yield a callback `advance(n_done)` that moves a bar on stderr (None when disabled), in the
    shape the engine's `progress=` argument takes."""
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        _ImagesPerSecond(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    task = progress.add_task(label, total=total)
    with progress:
        yield lambda n: progress.advance(task, n)
