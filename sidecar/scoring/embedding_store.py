"""A persistent store of document embeddings for the bi-encoder, one SQLite file per (model, settings).

Document embeddings depend only on the model, its precision and its length limit, never on the query, so
a restarted sidecar (or a second replay of the same corpus) need not embed a document it embedded before.
The file name carries the model's content hash, the dtype and the max length, so a changed model or
setting can never be served a stale vector; rows are keyed by the caller's 16-byte hash of the text the
model reads (`bi_encoder.text_key`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class EmbeddingStore:
    """get_many / put_many of float32 vectors; safe to call from any thread (one connection, one lock)."""

    def __init__(self, directory: str | Path, model_revision: str, dtype: str, max_length: int) -> None:
        directory = Path(directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        safe_revision = model_revision.replace(":", "-").replace("/", "-")
        self.path = directory / f"{safe_revision}.{dtype}.len{max_length}.sqlite"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS embedding (key BLOB PRIMARY KEY, vector BLOB NOT NULL)")
        self.hits = 0
        self.misses = 0
        count = self._db.execute("SELECT COUNT(*) FROM embedding").fetchone()[0]
        log.info("document embedding store %s: %d embeddings", self.path, count)

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        """The stored vectors of those `keys` that have one (writable copies)."""
        unique = list(dict.fromkeys(keys))
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(unique), 500):  # SQLite's bound-parameter limit
                chunk = unique[start : start + 500]
                rows = self._db.execute(
                    f"SELECT key, vector FROM embedding WHERE key IN ({','.join('?' * len(chunk))})", chunk
                ).fetchall()
                for key, blob in rows:
                    found[bytes(key)] = np.frombuffer(blob, dtype=np.float32).copy()
        self.hits += len(found)
        self.misses += len(unique) - len(found)
        return found

    def put_many(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        rows = [
            (k, np.ascontiguousarray(v, dtype=np.float32).tobytes())
            for k, v in zip(keys, vectors, strict=True)
        ]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO embedding (key, vector) VALUES (?, ?)", rows)
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
