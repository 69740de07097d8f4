"""Shared plumbing for the sentence-transformers-backed scorers: loading, precision, measuring."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sidecar.scoring.base import Pair, clip_text


def quiet_transformers() -> None:
    """Model loading progress bars belong in a CLI, not in a server log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def to_device(features: dict[str, Any], device: Any) -> dict[str, Any]:
    import torch

    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}


def model_max_length(tokenizer_limit: int | None, config: Any, fallback: int = 512) -> int:
    """The usable pair length: the tokenizer's limit unless it is the 'unlimited' sentinel."""
    if tokenizer_limit and tokenizer_limit < 1_000_000:
        return int(tokenizer_limit)
    return int(getattr(config, "max_position_embeddings", fallback) or fallback)


def quantize_int8(model: Any, placement: Any) -> None:
    """Dynamic int8 quantisation of every Linear layer, in place (CPU, float32 models only)."""
    import warnings

    import torch

    if placement.device != "cpu" or placement.dtype != "float32":
        raise ValueError("--quantize int8 needs --device cpu and --dtype float32")
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # torch.ao's deprecation notice points at torchao; the API still works
        torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


class SentenceTransformersScorer:
    """Loads a sentence-transformers model class with our device, dtype, attention and quantisation,
    and measures token lengths on a private tokenizer copy. Subclasses add `score`."""

    backend = ""
    engine_output = "scores"  # what the engine returns: "scores" or "sentence_embedding"

    def __init__(self, model_cls: Any, source: Any, placement: Any, settings: Any, **kwargs: Any) -> None:
        import copy
        import dataclasses
        import threading

        import torch

        from sidecar.scoring.runtimes import EngineSpec, build_engine, load_dtype

        quiet_transformers()
        self.placement = placement
        self.model = model_cls(
            source.path_or_id,
            device=placement.device,
            revision=None if source.local else source.revision,
            local_files_only=source.local,
            trust_remote_code=settings.trust_remote_code,
            model_kwargs={
                "dtype": dataclasses.replace(placement, dtype=load_dtype(settings, placement)).torch_dtype(),
                "attn_implementation": placement.attention,
            },
            **kwargs,
        )
        self.model.eval()
        if settings.quantize == "int8" and settings.runtime == "torch":
            quantize_int8(self.model, placement)
        self.source = source
        self.engine = build_engine(
            EngineSpec(self.model, self.engine_output, self._featurize, source, placement), settings
        )
        self.dtype_name = self.engine.precision
        # HF fast tokenizers keep padding/truncation state on the object: measuring (tokenize threads)
        # and scoring (the model thread) must never share one, and measuring is serialised.
        self._measure_tokenizer = copy.deepcopy(self.model.tokenizer)
        self._measure_lock = threading.Lock()
        self._device = torch.device(placement.device)

    def _featurize(self, pairs: list[tuple[str, str]]) -> dict[str, Any]:
        """Model features for (query, document) pairs: the pairs for a cross-encoder, every text
        alone for a bi-encoder (export examples and int8 calibration)."""
        if self.engine_output == "scores":
            return self.model.preprocess(pairs)  # type: ignore[no-any-return]
        return self.model.preprocess([q for q, _ in pairs] + [d for _, d in pairs])  # type: ignore[no-any-return]

    def _model_info(self, max_length: int) -> Any:
        from sidecar.types import ModelInfo

        return ModelInfo(
            model_id=self.source.model_id,
            revision=self.source.revision,
            backend=self.backend,
            device=str(self._device),
            dtype=self.dtype_name,
            runtime=self.engine.runtime,
            attention=self.placement.attention,
            max_length=max_length,
            accepts_instruction=any((getattr(self.model, "prompts", None) or {}).values()),
        )

    def _token_lengths(self, first: list[str], second: list[str] | None = None) -> list[int]:
        """Untruncated token counts (special tokens included) of texts or text pairs."""
        with self._measure_lock:
            enc = self._measure_tokenizer(
                first, second, truncation=False, add_special_tokens=True, verbose=False
            )
        return [len(ids) for ids in enc["input_ids"]]

    def _count(self, text: str) -> int:
        with self._measure_lock:
            enc = self._measure_tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)
        return len(enc["input_ids"])

    def count_tokens(self, text: str) -> int:
        return self._count(text)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        with self._measure_lock:
            enc = self._measure_tokenizer(
                text, add_special_tokens=False, truncation=False, return_offsets_mapping=True, verbose=False
            )
        return [(int(a), int(b)) for a, b in enc["offset_mapping"]]

    def _clip(
        self, pairs: Sequence[Pair], tokens: int, longer_than_query: bool = False
    ) -> tuple[list[Pair], list[Pair | None]]:
        """Each pair with its document clipped to about `tokens` tokens (`clip_text`); the clipped
        pairs, and per pair the clipped one or None where nothing was cut.

        `longer_than_query`: pair truncation ('longest_first') trims whichever text is longer, so a
        document must stay longer than its query for the kept tokens to be the same.
        """
        query_tokens: dict[str, int] = {}
        out: list[Pair] = []
        changed: list[Pair | None] = []
        for p in pairs:
            need = tokens
            if longer_than_query:
                if p.query not in query_tokens:
                    query_tokens[p.query] = self._count((p.instruction or "") + p.query)
                need += query_tokens[p.query]
            doc = clip_text(p.document, need, self._count)
            clipped = p._replace(document=doc) if doc is not p.document else None
            out.append(clipped or p)
            changed.append(clipped)
        return out, changed
