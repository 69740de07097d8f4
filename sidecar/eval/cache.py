"""The evaluator's on-disk cache: where it lives, how entries are keyed, and how they are written safely.

Entries (downloaded datasets, Lucene indexes, corpus embeddings) are keyed by a hash of their *content* and of
every parameter that changes them, so a changed corpus or setting can never be served a stale entry.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV_CACHE_DIR = "RERANK_CACHE_DIR"
_COMPLETE = ".complete"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """`override`, else $RERANK_CACHE_DIR, else ~/.cache/rerank-sidecar."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rerank-sidecar"


def use_dir(path: str | os.PathLike[str]) -> None:
    """Make `path` the cache of this process and the processes it starts (datasets, indexes, embeddings)."""
    os.environ[ENV_CACHE_DIR] = str(Path(path).expanduser())


def digest(*parts: str | bytes) -> str:
    """A short stable key for a sequence of parts (each part is length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for part in parts:
        b = part.encode() if isinstance(part, str) else part
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:20]


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_complete(entry: Path) -> bool:
    return (entry / _COMPLETE).exists()


@contextmanager
def building(entry: Path) -> Iterator[Path]:
    """Yield a scratch directory that becomes `entry` only if the block finishes.

    An interrupted build (Ctrl-C during indexing) therefore never leaves a half-written entry that a later run
    would trust; two concurrent builders both succeed and the last rename wins with identical content.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        yield scratch
        (scratch / _COMPLETE).touch()
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        try:
            scratch.rename(entry)
        except OSError:
            # Another process finished the same entry first; its content is identical by construction.
            if not is_complete(entry):
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
