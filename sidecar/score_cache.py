"""The score cache: a (query, document) pair's model score, kept so a repeated pair costs no forward pass.

It sits in the service, in front of the batcher, and is shared by every front end. A key is the SHA-256 of
everything the score depends on: the model's identity (id, content revision, backend, dtype), the
instruction, the query, the document text as the model reads it, and the truncation settings (max length,
and the window settings when long documents are split).
The value is the score the model returned (a float32 widened to a Python float, so a hit is bit-identical
to the fresh score) and whether the pair was truncated. Least recently used entries leave first once the
bytes held would pass `score_cache_bytes`; a request may bypass the cache (it neither reads nor writes).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from sidecar.metrics import Metrics
from sidecar.types import ModelInfo

# Bytes one entry holds in CPython, measured with tracemalloc (tests/test_score_cache.py checks this is not
# below what an entry really costs): the 32-byte digest as a bytes object, the value tuple and its float, and
# the OrderedDict's slot and linked-list node. Measured 239-293 bytes (the dict's table grows in steps, so the
# cost per entry is highest just after it doubles); 300 keeps the bound an upper bound.
ENTRY_BYTES = 300


class CachedScore(NamedTuple):
    score: float
    truncated: bool


# What a WindowedScore holds beyond a CachedScore: three more tuple slots and two offsets as int objects.
# Measured 88 bytes with tracemalloc (tests/test_long_documents.py checks this is not below it).
WINDOWED_EXTRA_BYTES = 100


class WindowedScore(NamedTuple):
    """A long document's score from its windows (sidecar/windows.py) and the winning window; only
    documents longer than the model's limit are stored this way (long_documents=windows)."""

    score: float
    truncated: bool
    passage_start: int
    passage_end: int
    windows: int


Entry = CachedScore | WindowedScore


def model_key(info: ModelInfo) -> bytes:
    """What identifies the model's scores: a different checkpoint, backend or precision scores differently."""
    return "\x1f".join((info.model_id, info.revision, info.backend, info.dtype)).encode()


class ScoreCache:
    def __init__(self, max_bytes: int, metrics: Metrics) -> None:
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_held(self) -> int:
        return self._bytes

    @staticmethod
    def cost(entry: Entry) -> int:
        return ENTRY_BYTES + (WINDOWED_EXTRA_BYTES if isinstance(entry, WindowedScore) else 0)

    @staticmethod
    def keys(
        info: ModelInfo,
        instruction: str | None,
        query: str,
        documents: Sequence[str],
        max_length: int,
        long_documents: str = "truncate",
    ) -> list[bytes]:
        """One key per document. The shared prefix is hashed once; each document adds its own text."""
        prefix = hashlib.sha256(model_key(info))
        for part in (f"len={max_length}", long_documents, instruction or "", query):
            encoded = part.encode("utf-8", "surrogatepass")
            prefix.update(len(encoded).to_bytes(8, "little"))
            prefix.update(encoded)
        keys = []
        for text in documents:
            h = prefix.copy()
            h.update(text.encode("utf-8", "surrogatepass"))
            keys.append(h.digest())
        return keys

    def get_many(self, keys: Sequence[bytes]) -> list[Entry | None]:
        found = []
        for k in keys:
            entry = self._entries.get(k)
            if entry is not None:
                self._entries.move_to_end(k)
            found.append(entry)
        hits = sum(e is not None for e in found)
        if hits:
            self.metrics.score_cache_hits.inc(hits)
        if len(keys) - hits:
            self.metrics.score_cache_misses.inc(len(keys) - hits)
        return found

    def put_many(self, items: Sequence[tuple[bytes, Entry]]) -> None:
        if self.max_bytes < ENTRY_BYTES:
            return
        for k, v in items:
            old = self._entries.get(k)
            if old is not None:
                self._bytes -= self.cost(old)
            self._entries[k] = v
            self._entries.move_to_end(k)
            self._bytes += self.cost(v)
        evicted = 0
        while self._bytes > self.max_bytes:
            _, gone = self._entries.popitem(last=False)
            self._bytes -= self.cost(gone)
            evicted += 1
        if evicted:
            self.metrics.score_cache_evictions.inc(evicted)
        self.metrics.score_cache_bytes.set(self.bytes_held)
