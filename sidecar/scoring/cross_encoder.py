"""Cross-encoder backend: any HF sequence-classification reranker or sentence-transformers modular
CrossEncoder (e.g. Ettin: ModernBERT, CLS pooling, Dense -> LayerNorm -> Dense head).

Loading and the module stack come from sentence-transformers, so scores follow `CrossEncoder.predict`
semantics (the model's own activation function); batching, ordering and precision are ours.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence

import numpy as np

from sidecar.scoring._st import model_max_length, quantize_int8, quiet_transformers, to_device
from sidecar.scoring.base import Measure, Pair, Scorer
from sidecar.scoring.device import Placement
from sidecar.settings import Settings
from sidecar.types import ModelInfo


class CrossEncoderScorer(Scorer):
    def __init__(self, source, placement: Placement, settings: Settings) -> None:  # type: ignore[no-untyped-def]
        import torch
        from sentence_transformers import CrossEncoder

        quiet_transformers()
        self.placement = placement
        self.model = CrossEncoder(
            source.path_or_id,
            device=placement.device,
            revision=None if source.local else source.revision,
            local_files_only=source.local,
            trust_remote_code=settings.trust_remote_code,
            model_kwargs={"dtype": placement.torch_dtype(), "attn_implementation": placement.attention},
            max_length=settings.max_length,
        )
        self.model.eval()
        dtype_name = placement.dtype
        if settings.quantize == "int8":
            quantize_int8(self.model, placement)
            dtype_name = "int8-dynamic"
        if self.model.num_labels != 1:
            raise ValueError(
                f"{source.model_id} has {self.model.num_labels} output labels; a reranker needs exactly one "
                "relevance score (pick a reranker / cross-encoder checkpoint)"
            )
        # HF fast tokenizers keep padding/truncation state on the object: measuring (tokenize threads)
        # and scoring (the model thread) must never share one, and measuring is serialised.
        self._measure_tokenizer = copy.deepcopy(self.model.tokenizer)
        self._measure_lock = threading.Lock()
        self.max_length = settings.max_length or model_max_length(
            self.model.max_length, getattr(self.model[0], "config", None)
        )
        self._device = torch.device(placement.device)
        self.info = ModelInfo(
            model_id=source.model_id,
            revision=source.revision,
            backend="cross-encoder",
            device=str(self._device),
            dtype=dtype_name,
            attention=placement.attention,
            max_length=self.max_length,
            accepts_instruction=any((getattr(self.model, "prompts", None) or {}).values()),
        )

    @staticmethod
    def _texts(pairs: Sequence[Pair]) -> list[tuple[str, str]]:
        # Instructions are prepended to the query, as sentence-transformers applies prompts.
        return [((p.instruction or "") + p.query, p.document) for p in pairs]

    def measure(self, pairs: Sequence[Pair]) -> list[Measure]:
        texts = self._texts(pairs)
        with self._measure_lock:
            enc = self._measure_tokenizer(
                [q for q, _ in texts],
                [d for _, d in texts],
                truncation=False,
                add_special_tokens=True,
                verbose=False,
            )
        return [
            Measure(min(len(ids), self.max_length), len(ids) > self.max_length) for ids in enc["input_ids"]
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
