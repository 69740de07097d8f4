"""Bi-encoder backend: cosine similarity of query and document embeddings from a sentence-transformers
embedding model (the packaged all-MiniLM-L6-v2 by default).

Each distinct query in a batch is embedded once, so a 100-document request costs one query forward.
Document embeddings do not depend on the query, so the most recent `embedding_cache_size` of them are
kept (keyed by text, per loaded model): a document seen before costs no forward pass at all. With
`embedding_cache_dir` they also persist on disk (`embedding_store`), across restarts and replays.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from sidecar.scoring._st import SentenceTransformersScorer, model_max_length, to_device
from sidecar.scoring.base import Measure, Pair, Scorer
from sidecar.scoring.device import Placement
from sidecar.settings import Settings


class BiEncoderScorer(SentenceTransformersScorer, Scorer):
    backend = "bi-encoder"

    def __init__(self, source, placement: Placement, settings: Settings) -> None:  # type: ignore[no-untyped-def]
        from sentence_transformers import SentenceTransformer

        super().__init__(SentenceTransformer, source, placement, settings)
        if settings.max_length:
            self.model.max_seq_length = settings.max_length
        self.max_length = model_max_length(self.model.max_seq_length, getattr(self.model[0], "config", None))
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = settings.embedding_cache_size
        self._cache_lock = threading.Lock()  # measure() peeks from the tokenize threads
        self.info = self._model_info(self.max_length)
        self._store = None
        if settings.embedding_cache_dir:
            from sidecar.scoring.embedding_store import EmbeddingStore

            self._store = EmbeddingStore(
                settings.embedding_cache_dir, source.revision, self.dtype_name, self.max_length
            )

    def measure(self, pairs: Sequence[Pair]) -> list[Measure]:
        lengths = self._token_lengths([p.document for p in pairs])
        with self._cache_lock:
            cached = [p.document in self._cache for p in pairs]
        # A cached document costs (almost) nothing to score, which the batcher's token budget should know.
        return [
            Measure(1 if hit else min(n, self.max_length), n > self.max_length)
            for n, hit in zip(lengths, cached, strict=True)
        ]

    def _embed(self, texts: list[str]):  # type: ignore[no-untyped-def]
        import torch

        features = self.model.preprocess(texts)
        emb = self.model(to_device(features, self._device))["sentence_embedding"].float()
        return torch.nn.functional.normalize(emb, p=2, dim=1)

    def _documents(self, texts: list[str]):  # type: ignore[no-untyped-def]
        import torch

        if self._cache_size <= 0 and self._store is None:
            return self._embed(texts)
        with self._cache_lock:
            known = {t: self._cache[t] for t in texts if t in self._cache}
            for t in known:
                self._cache.move_to_end(t)
        from_memory = set(known)
        missing = list(dict.fromkeys(t for t in texts if t not in known))
        if missing and self._store is not None:
            stored = self._store.get_many(missing)
            for t, v in stored.items():
                known[t] = torch.from_numpy(v.copy()).to(self._device)
            missing = [t for t in missing if t not in stored]
        if missing:
            fresh = self._embed(missing)
            if self._store is not None:
                self._store.put_many(missing, fresh.cpu().numpy())
            for t, e in zip(missing, fresh, strict=True):
                known[t] = e
        with self._cache_lock:
            for t, e in known.items():
                if t not in from_memory and self._cache_size > 0:
                    self._cache[t] = e
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return torch.stack([known[t] for t in texts])

    def score(self, pairs: Sequence[Pair]) -> np.ndarray:
        import torch

        queries = list(dict.fromkeys((p.instruction or "") + p.query for p in pairs))
        q_row = {q: i for i, q in enumerate(queries)}
        with torch.inference_mode():
            q_emb = self._embed(queries)
            d_emb = self._documents([p.document for p in pairs])
            rows = torch.tensor([q_row[(p.instruction or "") + p.query] for p in pairs], device=q_emb.device)
            scores = (q_emb[rows] * d_emb).sum(dim=1)
        return scores.cpu().numpy().astype(np.float32)
