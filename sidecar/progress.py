"""Progress display for long work (replay, indexing, tuning, fine-tuning), on a terminal and off it.

On a terminal it is rich's live bar. Off a terminal (CI, nohup, a log file) a live bar prints nothing until
the end, so long work would look hung: there the same calls print plain lines instead, when a task starts,
at every tenth of its total (at most one line per `min_interval` seconds) and when it completes.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = round(seconds)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class LineProgress(Progress):
    """rich's Progress API, reporting by printed lines instead of a live bar."""

    def __init__(self, console: Console, min_interval: float = 5.0) -> None:
        super().__init__(console=console, disable=True)
        self.min_interval = min_interval
        self._reported: dict[TaskID, tuple[float, int]] = {}  # task -> (when, tenths reported)

    def add_task(  # type: ignore[override]
        self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0, **kw: Any
    ) -> TaskID:
        task_id = super().add_task(description, start=start, total=total, completed=completed, **kw)
        size = f" ({int(total)})" if total is not None and total != 100.0 else ""
        self.console.print(f"{description}{size} ...", highlight=False)
        self._reported[task_id] = (time.monotonic(), 0)
        return task_id

    def update(self, task_id: TaskID, **kw: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kw)
        self._report(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def _report(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        if not task.total:
            return
        when, tenths = self._reported.get(task_id, (0.0, 0))
        now = time.monotonic()
        done = task.completed >= task.total
        reached = int(10 * task.completed / task.total)
        if tenths >= 10 or (not done and (reached <= tenths or now - when < self.min_interval)):
            return
        self._reported[task_id] = (now, 10 if done else reached)
        if done:
            line = f"{task.description}: done, {int(task.completed)} in {_clock(task.elapsed)}"
        else:
            line = (
                f"{task.description}: {int(task.completed)}/{int(task.total)} "
                f"({100 * task.completed / task.total:.0f}%), {_clock(task.elapsed)} elapsed, "
                f"about {_clock(task.time_remaining)} left"
            )
        self.console.print(line, highlight=False)


def progress_display(console: Console) -> Progress:
    """A live bar on a terminal, plain progress lines elsewhere; use it as a context manager."""
    if not console.is_terminal:
        return LineProgress(console)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
