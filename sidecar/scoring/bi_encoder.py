"""Bi-encoder backend: cosine similarity of query and document embeddings from a sentence-transformers
embedding model (the packaged all-MiniLM-L6-v2 by default).

Each distinct query in a batch is embedded once, so a 100-document request costs one query forward.
Document embeddings do not depend on the query, so the most recent ones are kept up to
`embedding_cache_bytes` (per loaded model, keyed by a 16-byte hash of the text the model reads): a
document seen before costs no forward pass at all, and a long document costs the cache no more than a
short one. With `embedding_cache_dir` they also persist on disk (`embedding_store`), across restarts
and replays, under the same keys.

Tokenize once: `measure` (tokenize threads) encodes each pair's query and document (truncated token
ids, checked at load to equal `preprocess`); `score` (model thread) only stacks the ones it embeds.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from sidecar.scoring._st import SentenceTransformersScorer, model_max_length
from sidecar.scoring.base import Measure, Pair, Scorer
from sidecar.scoring.device import Placement
from sidecar.scoring.encodings import TokenIds, collate
from sidecar.settings import Settings

# What one cache entry costs beyond its float32 vector: the 16-byte key, the numpy array object and
# the dict slot (measured ~315 bytes on CPython 3.11; rounded up).
ENTRY_OVERHEAD_BYTES = 384


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class EmbeddingCache:
    """Least-recently-used document embeddings, bounded in bytes. Thread-safe (measure peeks from the
    tokenize threads, score fills it from the model thread)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        with self._lock:
            found = {k: self._entries[k] for k in keys if k in self._entries}
            for k in found:
                self._entries.move_to_end(k)
        return found

    def put(self, key: bytes, embedding: np.ndarray) -> None:
        # A copy of its own: a row of the batch's matrix would keep the whole batch alive.
        value = np.array(embedding, dtype=np.float32, copy=True)
        cost = value.nbytes + ENTRY_OVERHEAD_BYTES
        if cost > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes + ENTRY_OVERHEAD_BYTES
            self._entries[key] = value
            self.bytes += cost
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes + ENTRY_OVERHEAD_BYTES


class PairEncoding(NamedTuple):
    """A pair's encodings for a bi-encoder: query and document are embedded apart."""

    query: TokenIds
    document: TokenIds


class BiEncoderScorer(SentenceTransformersScorer, Scorer):
    backend = "bi-encoder"
    engine_output = "sentence_embedding"

    def __init__(self, source, placement: Placement, settings: Settings) -> None:  # type: ignore[no-untyped-def]
        from sentence_transformers import SentenceTransformer

        super().__init__(SentenceTransformer, source, placement, settings)
        if settings.max_length:
            self.model.max_seq_length = settings.max_length
        self.max_length = model_max_length(self.model.max_seq_length, getattr(self.model[0], "config", None))
        self.cache = EmbeddingCache(settings.embedding_cache_bytes)
        self.info = self._model_info(self.max_length)
        self._store = None
        if settings.embedding_cache_dir:
            from sidecar.scoring.embedding_store import EmbeddingStore

            self._store = EmbeddingStore(
                settings.embedding_cache_dir, source.revision, self.dtype_name, self.max_length
            )
        # Non-tensor features preprocess adds (the modality); None: measure makes no encodings.
        first, second = self._probe_texts()
        self._extras = self._exact_collate(first + second)

    def measure(self, pairs: Sequence[Pair]) -> list[Measure]:
        # The model reads at most max_length tokens of a document, so no more of it matters.
        pairs, clipped = self._clip(pairs, self.max_length)
        encodings: list[PairEncoding] | list[None] = [None] * len(pairs)
        if self._extras is None:
            lengths = self._token_lengths([p.document for p in pairs])
            truncated = [n > self.max_length for n in lengths]
        else:
            docs, truncated = self._encode_measured([p.document for p in pairs], None, clipped)
            lengths = [len(d) for d in docs]
            queries = list(dict.fromkeys((p.instruction or "") + p.query for p in pairs))
            query_ids = dict(zip(queries, self._encode(queries), strict=True))
            encodings = [
                PairEncoding(query_ids[(p.instruction or "") + p.query], d)
                for p, d in zip(pairs, docs, strict=True)
            ]
        cached = [text_key(p.document) in self.cache for p in pairs] if self.cache.max_bytes else []
        # A cached document costs (almost) nothing to score, which the batcher's token budget should know.
        return [
            Measure(
                1 if cached and cached[i] else min(n, self.max_length), truncated[i], clipped[i], encodings[i]
            )
            for i, n in enumerate(lengths)
        ]

    def window_budget(self, pair: Pair) -> int | None:
        # The document is embedded alone: its window needs room only for the special tokens.
        return self.max_length - self._token_lengths([""])[0]

    def _embed(self, texts: list[str], encodings: list[TokenIds] | None = None):  # type: ignore[no-untyped-def]
        """Normalised embeddings of `texts`, from their encodings when given (pre: stacking only)."""
        import torch

        if encodings is not None and self._extras is not None:
            features = {**collate(encodings, self._padding), **self._extras}
        else:
            features = self.model.preprocess(texts)
        emb = self.engine.run(features)
        return torch.nn.functional.normalize(emb, p=2, dim=1)

    def _documents(self, texts: list[str], encodings: list[TokenIds] | None):  # type: ignore[no-untyped-def]
        import torch

        if self.cache.max_bytes <= 0 and self._store is None:
            return self._embed(texts, encodings)
        keys = [text_key(t) for t in texts]
        known: dict[bytes, Any] = {k: torch.from_numpy(v) for k, v in self.cache.get(keys).items()}
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in known}
        encoded = dict(zip(keys, encodings, strict=True)) if encodings is not None else None
        if missing and self._store is not None:
            for k, v in self._store.get_many(list(missing)).items():
                self.cache.put(k, v)
                known[k] = torch.from_numpy(v)
                del missing[k]
        if missing:
            fresh = self._embed(list(missing.values()), [encoded[k] for k in missing] if encoded else None)
            host = fresh.cpu().numpy()
            if self._store is not None:
                self._store.put_many(list(missing), host)
            for i, k in enumerate(missing):
                self.cache.put(k, host[i])
                known[k] = fresh[i]
        return torch.stack([known[k].to(self._device) for k in keys])

    def score(
        self, pairs: Sequence[Pair], encodings: Sequence[object] | None = None, *, first_pass: bool = False
    ) -> np.ndarray:
        if first_pass:
            raise ValueError("first_pass needs a cascade, which only cross-encoders have")
        import torch

        texts = [(p.instruction or "") + p.query for p in pairs]
        queries = list(dict.fromkeys(texts))
        q_row = {q: i for i, q in enumerate(queries)}
        q_ids: list[TokenIds] | None = None
        d_ids: list[TokenIds] | None = None
        if encodings is not None and self._extras is not None:
            own = [e for e in encodings if isinstance(e, PairEncoding)]
            if len(own) != len(pairs):
                raise TypeError("encodings must be this scorer's own (Measure.encoding from its measure)")
            first = {t: e.query for t, e in zip(texts, own, strict=True)}
            q_ids = [first[q] for q in queries]
            d_ids = [e.document for e in own]
        with torch.inference_mode():
            q_emb = self._embed(queries, q_ids)
            d_emb = self._documents([p.document for p in pairs], d_ids)
            rows = torch.tensor([q_row[(p.instruction or "") + p.query] for p in pairs], device=q_emb.device)
            scores = (q_emb[rows] * d_emb).sum(dim=1)
        return scores.cpu().numpy().astype(np.float32)
