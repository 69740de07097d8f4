"""Shared plumbing for the sentence-transformers-backed scorers: loading, precision, measuring."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sidecar.scoring.base import Pair, clip_text
from sidecar.scoring.encodings import Padding, TokenIds, collate, token_ids

log = logging.getLogger(__name__)


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
    and measures token lengths (and encodes) on a private tokenizer copy. Subclasses add `score`."""

    backend = ""
    engine_output = "scores"  # what the engine returns: "scores" or "sentence_embedding"
    max_length: int

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
        # A cascade's fast first pass beside it (settings.cascade), from the same float32 weights.
        self.first_engine = None
        if settings.cascade not in ("auto", "none"):
            self.first_engine = self._cascade_engine(settings)
        self.cascade_depth = settings.cascade_depth if self.first_engine is not None else 0
        # Read once by the batcher: packed batches are budgeted in real tokens, padded ones in n x longest.
        self.padding_free = bool(getattr(self.engine, "padding_free", False))
        # HF fast tokenizers keep padding/truncation state on the object: measuring (tokenize threads)
        # and scoring (the model thread) must never share one, and measuring is serialised.
        self._measure_tokenizer = copy.deepcopy(self.model.tokenizer)
        self._measure_lock = threading.Lock()
        self._padding = Padding.of(self.model.tokenizer)
        self._device = torch.device(placement.device)

    def _cascade_engine(self, settings: Any) -> Any:
        """The engine of the cascade's first pass (`settings.cascade`, a RUNTIME/PRECISION key)."""
        from sidecar.scoring import runtimes as rt

        if self.engine_output != "scores":
            raise rt.RuntimeUnavailable(
                "--cascade re-scores a cross-encoder's top documents; a bi-encoder scores each document "
                "once: use --cascade none"
            )
        if self.placement.device != "cpu":
            raise rt.RuntimeUnavailable(
                "--cascade runs its first pass on the CPU: use --cascade none on CUDA"
            )
        if settings.runtime == "torch" and settings.quantize == "int8":
            raise rt.RuntimeUnavailable(
                "--cascade needs float32 weights beside the served engine, and --runtime torch --quantize "
                "int8 quantises them in place: serve another precision, or --cascade none"
            )
        runtime, dtype, quantize = rt.CONFIGS[settings.cascade]
        first = settings.model_copy(update={"runtime": runtime, "dtype": dtype, "quantize": quantize})
        spec = rt.EngineSpec(
            self.model, self.engine_output, self._featurize, self.source, rt.placement_for(first)
        )
        return rt.build_engine(spec, first)

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
            cascade=(
                f"{self.first_engine.runtime}/{self.first_engine.precision}" if self.first_engine else ""
            ),
            cascade_depth=self.cascade_depth,
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

    def _encode(self, first: list[str], second: list[str] | None = None) -> list[TokenIds]:
        """Token ids of texts or text pairs as the model reads them: truncated at max_length as
        sentence-transformers' `preprocess` truncates ('longest_first'), special tokens in."""
        with self._measure_lock:
            enc = self._measure_tokenizer(
                first,
                second,
                truncation="longest_first",
                max_length=self.max_length,
                add_special_tokens=True,
                return_attention_mask=False,
                verbose=False,
            )
        return token_ids(enc)

    def _encode_measured(
        self, first: list[str], second: list[str] | None, clipped: Sequence[Pair | None]
    ) -> tuple[list[TokenIds], list[bool]]:
        """`_encode`, and per row whether the text was longer than the model reads. A clipped row was
        (`clip_text` keeps more than max_length tokens); only a row that fills max_length exactly is
        counted again untruncated, and its text is already clipped to about max_length tokens."""
        encodings = self._encode(first, second)
        truncated = [c is not None for c in clipped]
        full = [i for i, e in enumerate(encodings) if len(e) >= self.max_length and not truncated[i]]
        if full:
            lengths = self._token_lengths(
                [first[i] for i in full], [second[i] for i in full] if second is not None else None
            )
            for i, n in zip(full, lengths, strict=True):
                truncated[i] = n > self.max_length
        return encodings, truncated

    def _exact_collate(self, first: list[str], second: list[str] | None = None) -> dict[str, Any] | None:
        """What `collate` lacks of `preprocess`'s features (non-tensor entries such as the modality) when
        its tensors equal `preprocess`'s for these texts; None when they differ (an input module that is
        not a plain tokenizer): the scorer then tokenizes in `score` as sentence-transformers does."""
        import torch

        inputs: list[Any] = list(zip(first, second, strict=True)) if second is not None else list(first)
        try:
            reference = self.model.preprocess(inputs)
            ours = collate(self._encode(first, second), self._padding)
        except Exception:  # an input module we cannot mirror: the reference path still works
            log.info(
                "%s: no encodings while measuring; tokenizing in score", self.source.model_id, exc_info=True
            )
            return None
        tensors = {k: v for k, v in reference.items() if isinstance(v, torch.Tensor)}
        if tensors.keys() != ours.keys() or not all(torch.equal(tensors[k], ours[k]) for k in ours):
            log.info(
                "%s: encodings made while measuring differ from preprocess; tokenizing in score",
                self.source.model_id,
            )
            return None
        return {k: v for k, v in reference.items() if not isinstance(v, torch.Tensor)}

    def _probe_texts(self) -> tuple[list[str], list[str]]:
        """Pairs that exercise truncation from either side and padding, for `_exact_collate`."""
        long = "relevance of a long passage " * (self.max_length // 2 + 1)
        return (
            ["what does a reranker do", "q", long],
            ["A reranker scores each candidate.", long, "short document"],
        )

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
