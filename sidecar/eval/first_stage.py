"""The first-stage retriever interface the replay drives, and the factory that builds one from CLI options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from rich.progress import Progress


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float


class FirstStage(Protocol):
    """Retrieves the candidates that the rerank stage reorders.

    `search` is called from several replay threads at once; `thread_exit` is called by each of those threads
    before it ends, for retrievers whose native resources are per thread (the JVM's thread attachment).
    """

    name: str

    def search(self, query: str, k: int) -> list[Hit]: ...

    def describe(self) -> dict[str, Any]: ...

    def thread_exit(self) -> None: ...

    def close(self) -> None: ...


def progress_task(progress: Progress | None, description: str, total: int | None) -> Any:
    """Add a task to `progress` if there is one; returns its id (or None)."""
    return progress.add_task(description, total=total) if progress is not None else None


def advance(progress: Progress | None, task: Any, n: int = 1) -> None:
    if progress is not None and task is not None:
        progress.advance(task, n)
