"""Cross-encoder backend: any HF sequence-classification reranker or sentence-transformers modular
CrossEncoder (e.g. Ettin: ModernBERT, CLS pooling, Dense -> LayerNorm -> Dense head), including causal-LM
rerankers packaged for sentence-transformers >= 5.4 (chat template + LogitScore head, docs/llm.md).

Loading and the module stack come from sentence-transformers, so scores follow `CrossEncoder.predict`
semantics (the model's own activation function); batching, ordering and precision are ours. For a
LogitScore model the request's instruction is `predict`'s `prompt` (the chat template places it).

Tokenize once: `measure` (tokenize threads) makes each pair's truncated token ids, checked at load to
equal what `preprocess` gives; `score` (model thread) only pads and stacks them (pre), runs the model
(core) and applies the activation (post). Chat rerankers tokenize in `score` through their template.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sidecar.scoring._st import SentenceTransformersScorer, model_max_length
from sidecar.scoring.base import Measure, Pair, Scorer
from sidecar.scoring.device import Placement
from sidecar.scoring.encodings import TokenIds, collate
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
        self._chat = _is_chat_reranker(self.model)
        if self._chat:
            # The template's own tokens (system prompt, tags) count in the pair's length.
            self._template_tokens = max(
                0, self._chat_length("", "", None) - self._token_lengths([""], [""])[0]
            )
            self.info = dataclasses.replace(self.info, accepts_instruction=True)
        # Non-tensor features preprocess adds (the modality); None: measure makes no encodings.
        self._extras = None if self._chat else self._exact_collate(*self._probe_texts())

    @staticmethod
    def _texts(pairs: Sequence[Pair]) -> list[tuple[str, str]]:
        # Instructions are prepended to the query, as sentence-transformers applies prompts.
        return [((p.instruction or "") + p.query, p.document) for p in pairs]

    def _chat_length(self, query: str, document: str, instruction: str | None) -> int:
        messages = ([{"role": "system", "content": instruction}] if instruction else []) + [
            {"role": "query", "content": query},
            {"role": "document", "content": document},
        ]
        with self._measure_lock:
            ids = self._measure_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        return len(ids["input_ids"])

    def measure(self, pairs: Sequence[Pair]) -> list[Measure]:
        # The model reads at most max_length tokens of the pair, so no more of the document matters.
        pairs, clipped = self._clip(pairs, self.max_length, longer_than_query=True)
        if self._chat:
            lengths = self._token_lengths([p.query for p in pairs], [p.document for p in pairs])
            extra = {
                i: self._chat_length("", "", i) - self._chat_length("", "", None)
                for i in {p.instruction for p in pairs}
            }
            lengths = [
                n + self._template_tokens + extra[p.instruction] for n, p in zip(lengths, pairs, strict=True)
            ]
        elif self._extras is not None:
            texts = self._texts(pairs)
            encodings, truncated = self._encode_measured(
                [q for q, _ in texts], [d for _, d in texts], clipped
            )
            return [Measure(len(e), t, c, e) for e, t, c in zip(encodings, truncated, clipped, strict=True)]
        else:
            texts = self._texts(pairs)
            lengths = self._token_lengths([q for q, _ in texts], [d for _, d in texts])
        return [
            Measure(min(n, self.max_length), n > self.max_length, c)
            for n, c in zip(lengths, clipped, strict=True)
        ]

    def window_budget(self, pair: Pair) -> int | None:
        # The pair with an empty document: the query, its instruction, special tokens or the template.
        if self._chat:
            fixed = self._chat_length(pair.query, "", pair.instruction)
        else:
            ((query, _),) = self._texts([pair])
            fixed = self._token_lengths([query], [""])[0]
        return self.max_length - fixed

    def score(
        self, pairs: Sequence[Pair], encodings: Sequence[object] | None = None, *, first_pass: bool = False
    ) -> np.ndarray:
        engine = self.engine
        if first_pass:
            if self.first_engine is None:
                raise ValueError("first_pass needs a cascade (settings.cascade)")
            engine = self.first_engine
        if encodings is not None and self._extras is not None:
            return self._forward(self._collate(encodings), engine)
        if not self._chat:
            return self._forward(self._preprocess(self._texts(pairs), None), engine)
        # One prompt per preprocess call: pairs are grouped by instruction.
        out = np.empty(len(pairs), dtype=np.float32)
        for instruction in dict.fromkeys(p.instruction for p in pairs):
            rows = [i for i, p in enumerate(pairs) if p.instruction == instruction]
            texts = [(pairs[i].query, pairs[i].document) for i in rows]
            out[rows] = self._forward(self._preprocess(texts, instruction), engine)
        return out

    # ---- pre: features from encodings made while measuring, or from the texts ------------------
    def _collate(self, encodings: Sequence[object]) -> dict[str, Any]:
        if not all(isinstance(e, TokenIds) for e in encodings):
            raise TypeError("encodings must be this scorer's own (Measure.encoding from its measure)")
        return {**collate(encodings, self._padding), **(self._extras or {})}  # type: ignore[arg-type]

    def _preprocess(self, texts: list[tuple[str, str]], prompt: str | None) -> dict[str, Any]:
        return self.model.preprocess(texts, prompt=prompt) if prompt else self.model.preprocess(texts)

    # ---- core + post --------------------------------------------------------------------------
    def _forward(self, features: dict[str, Any], engine: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            scores = engine.run(features)
            if self.model.activation_fn is not None:
                scores = self.model.activation_fn(scores)
            return scores.reshape(-1).cpu().numpy().astype(np.float32)


def _is_chat_reranker(model: object) -> bool:
    """A causal LM read through a LogitScore head (sentence-transformers >= 5.4)."""
    try:
        from sentence_transformers.cross_encoder.modules import LogitScore
    except ImportError:  # older sentence-transformers: no such models load anyway
        return False
    return any(isinstance(m, LogitScore) for m in model)  # type: ignore[attr-defined]
