"""Shared plumbing for the sentence-transformers-backed scorers: quiet loading and moving features."""

from __future__ import annotations

from typing import Any


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
