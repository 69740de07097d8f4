"""Cross-encoder backend: any HF sequence-classification reranker or sentence-transformers modular
CrossEncoder (e.g. Ettin: ModernBERT, CLS pooling, Dense -> LayerNorm -> Dense head).

Loading and the module stack come from sentence-transformers, so scores follow `CrossEncoder.predict`
semantics (the model's own activation function); batching, ordering and precision are ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sidecar.scoring._st import SentenceTransformersScorer, model_max_length, to_device
from sidecar.scoring.base import Measure, Pair, Scorer
from sidecar.scoring.device import Placement
from sidecar.settings import Settings


class CrossEncoderScorer(SentenceTransformersScorer, Scorer):
    backend = "cross-encoder"

    def __init__(self, source, placement: Placement, settings: Settings) -> None:  # type: ignore[no-untyped-def]
        from sentence_transformers import CrossEncoder

        super().__init__(CrossEncoder, source, placement, settings, max_length=settings.max_length)
        if self.model.num_labels != 1:
            raise ValueError(
                f"{source.model_id} has {self.model.num_labels} output labels; a reranker needs exactly one "
                "relevance score (pick a reranker / cross-encoder checkpoint)"
            )
        self.max_length = settings.max_length or model_max_length(
            self.model.max_length, getattr(self.model[0], "config", None)
        )
        self.info = self._model_info(self.max_length)

    @staticmethod
    def _texts(pairs: Sequence[Pair]) -> list[tuple[str, str]]:
        # Instructions are prepended to the query, as sentence-transformers applies prompts.
        return [((p.instruction or "") + p.query, p.document) for p in pairs]

    def measure(self, pairs: Sequence[Pair]) -> list[Measure]:
        # The model reads at most max_length tokens of the pair, so no more of the document matters.
        pairs, clipped = self._clip(pairs, self.max_length, longer_than_query=True)
        texts = self._texts(pairs)
        lengths = self._token_lengths([q for q, _ in texts], [d for _, d in texts])
        return [
            Measure(min(n, self.max_length), n > self.max_length, c)
            for n, c in zip(lengths, clipped, strict=True)
        ]

    def score(self, pairs: Sequence[Pair]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            features = self.model.preprocess(self._texts(pairs))
            out = self.model(to_device(features, self._device))
            scores = out["scores"].float()
            if self.model.activation_fn is not None:
                scores = self.model.activation_fn(scores)
            return scores.reshape(-1).cpu().numpy().astype(np.float32)
