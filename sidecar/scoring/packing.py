"""Padding-free batches for encoder cross-encoders: every pair of a batch in one row, attention kept
inside each pair by `cu_seqlens`, and the way back from that row to one score per pair.

On CUDA with flash-attn the row runs through transformers' `flash_attention_2`, which takes the packed
layout as keyword arguments (`cu_seq_lens_q/k`, `max_length_q/k`) and calls `flash_attn_varlen_func`:
no compute is spent on padding. The torch engine calls `packed_forward` when `supports_packing` says
the loaded model can take it. `REFERENCE_ATTENTION` is an exact, slow stand-in for the varlen kernel
(SDPA over one pair at a time) so that the whole packed path is tested on a CPU.

Supported: BERT, RoBERTa and XLM-RoBERTa sequence classifiers, ModernBERT (Ettin) classifiers, and
sentence-transformers modular cross-encoders whose first module is one of those encoders (e.g.
ModernBERT -> CLS pooling -> Dense -> LayerNorm -> Dense).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Attention kernels that honour the packed keyword arguments (others would attend across pairs).
REFERENCE_ATTENTION = "sidecar_varlen_reference"
PACKING_ATTENTION = frozenset({"flash_attention_2", "flash_attention_3", REFERENCE_ATTENTION})

# Encoder families whose embeddings and attention accept packed rows, and where their positions start:
# RoBERTa-style learned positions begin after the padding index.
_TOKEN_TYPE_ENCODERS = frozenset({"bert", "roberta", "xlm-roberta"})
_ENCODERS = _TOKEN_TYPE_ENCODERS | {"modernbert"}
_CLASSIFIERS = frozenset(
    {
        "BertForSequenceClassification",
        "RobertaForSequenceClassification",
        "XLMRobertaForSequenceClassification",
        "ModernBertForSequenceClassification",
    }
)


@dataclass(frozen=True)
class PackedBatch:
    """n sequences laid end to end in one row of `total` tokens (no padding anywhere)."""

    input_ids: torch.Tensor  # [total] int64
    position_ids: torch.Tensor  # [total] int64, restarting at `position_offset` for every sequence
    token_type_ids: torch.Tensor | None  # [total] int64, when the batch had them
    cu_seqlens: torch.Tensor  # [n + 1] int32: 0, end of sequence 0, ..., total
    max_seqlen: int
    # Where each packed token sat in the padded [n, padded_length] layout (flattened), for the way back.
    indices: torch.Tensor  # [total] int64
    padded_length: int

    @property
    def n(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def total(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: Any) -> PackedBatch:
        # `indices` stays where it is: only the way back to a padded layout reads it.
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            token_type_ids=(
                self.token_type_ids.to(device, non_blocking=True) if self.token_type_ids is not None else None
            ),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=True),
        )

    def attention_kwargs(self) -> dict[str, Any]:
        """What transformers' attention layers read to attend within each sequence only. The lengths
        are Python ints, so the kernel call needs no device-to-host sync."""
        return {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }


def pack(features: Mapping[str, Any], position_offset: int = 0) -> PackedBatch:
    """A padded batch (`input_ids`, `attention_mask`, optional `token_type_ids`, each [n, L]) packed into
    one row. Padding may sit on either side; each sequence's positions count its real tokens from
    `position_offset`. A row sentence-transformers already flattened (`cu_seq_lens_q`, as it does for
    feature-extraction models under flash-attn) is taken as it is."""
    if "attention_mask" not in features:
        if "cu_seq_lens_q" in features:
            return _from_flattened(features)
        raise ValueError("pack needs a padded batch with an attention_mask, or a flattened one")
    ids = features["input_ids"]
    mask = features["attention_mask"].to(torch.bool)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(
            f"pack needs [n, L] input_ids and attention_mask, got {tuple(ids.shape)} and {tuple(mask.shape)}"
        )
    lengths = mask.sum(dim=1)
    if ids.shape[0] == 0 or bool((lengths == 0).any()):
        raise ValueError("pack needs at least one sequence and at least one token in every sequence")
    positions = mask.cumsum(dim=1) - 1 + position_offset
    types = features.get("token_type_ids")
    return PackedBatch(
        input_ids=ids[mask],
        position_ids=positions[mask],
        token_type_ids=types[mask] if types is not None else None,
        cu_seqlens=_cumulative(lengths),
        max_seqlen=int(lengths.max()),
        indices=mask.reshape(-1).nonzero().reshape(-1),
        padded_length=int(ids.shape[1]),
    )


def pack_sequences(
    sequences: Sequence[Sequence[int]],
    token_type_ids: Sequence[Sequence[int]] | None = None,
    position_offset: int = 0,
) -> PackedBatch:
    """Token id lists (e.g. encodings made once at admission) packed directly, never padded."""
    lengths = [len(s) for s in sequences]
    if not lengths or min(lengths) == 0:
        raise ValueError("pack needs at least one sequence and at least one token in every sequence")
    width = max(lengths)
    return PackedBatch(
        input_ids=torch.tensor(list(itertools.chain.from_iterable(sequences)), dtype=torch.long),
        position_ids=torch.cat([torch.arange(n) for n in lengths]) + position_offset,
        token_type_ids=(
            torch.tensor(list(itertools.chain.from_iterable(token_type_ids)), dtype=torch.long)
            if token_type_ids is not None
            else None
        ),
        cu_seqlens=_cumulative(torch.tensor(lengths)),
        max_seqlen=width,
        indices=torch.cat([torch.arange(n) + i * width for i, n in enumerate(lengths)]),
        padded_length=width,
    )


def _from_flattened(features: Mapping[str, Any]) -> PackedBatch:
    cu = features["cu_seq_lens_q"].to(torch.int32).reshape(-1).cpu()
    lengths = cu.diff()
    width = int(lengths.max())
    starts = torch.repeat_interleave(cu[:-1].long(), lengths)
    local = torch.arange(int(cu[-1])) - starts  # each token's place in its own sequence
    row = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    types = features.get("token_type_ids")
    return PackedBatch(
        input_ids=features["input_ids"].reshape(-1),
        position_ids=features["position_ids"].reshape(-1),
        token_type_ids=types.reshape(-1) if types is not None else None,
        cu_seqlens=cu,
        max_seqlen=width,
        indices=row * width + local,
        padded_length=width,
    )


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


# ---- the way back -------------------------------------------------------------------------------
def first_tokens(values: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """Each sequence's first-token (CLS) row of packed outputs `[total, ...]` -> `[n, ...]`."""
    return values[packed.cu_seqlens[:-1].to(values.device, torch.long)]


def segment_mean(values: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """Mean over each sequence's tokens of packed outputs `[total, d]` -> `[n, d]`."""
    cu = packed.cu_seqlens.to(values.device, torch.long)
    lengths = cu.diff()
    segment = torch.repeat_interleave(torch.arange(packed.n, device=values.device), lengths)
    sums = torch.zeros(packed.n, *values.shape[1:], dtype=torch.float32, device=values.device)
    sums.index_add_(0, segment, values.float())
    return (sums / lengths.reshape(-1, *([1] * (values.ndim - 1)))).to(values.dtype)


def to_padded(values: torch.Tensor, packed: PackedBatch, fill: float | int = 0) -> torch.Tensor:
    """Packed per-token values `[total, ...]` back in the padded layout `[n, L, ...]`, `fill` elsewhere."""
    out = values.new_full((packed.n * packed.padded_length, *values.shape[1:]), fill)
    out[packed.indices.to(values.device)] = values
    return out.reshape(packed.n, packed.padded_length, *values.shape[1:])


# ---- the model ----------------------------------------------------------------------------------
def why_not_packed(model: Any) -> str | None:
    """None when `packed_forward` can run `model` (a sentence-transformers CrossEncoder); else why not,
    in one line for the log."""
    modules = list(model) if isinstance(model, torch.nn.Sequential) else [model]
    hf: Any = getattr(modules[0], "auto_model", None)
    if not isinstance(hf, torch.nn.Module) or getattr(modules[0], "backend", "torch") != "torch":
        return "the model is not a PyTorch transformers model"
    config: Any = hf.config
    attention = getattr(config, "_attn_implementation", None)
    if attention not in PACKING_ATTENTION:
        return f"attention '{attention}' pads every pair; packing needs flash_attention_2 (CUDA + flash-attn)"
    if config.model_type not in _ENCODERS:
        return f"'{config.model_type}' is not one of the packable encoders ({', '.join(sorted(_ENCODERS))})"
    task = getattr(modules[0], "transformer_task", None)
    if task == "sequence-classification":
        if type(hf).__name__ not in _CLASSIFIERS or len(modules) != 1:
            return f"{type(hf).__name__} has no packed classification head here"
        return None
    if task == "feature-extraction" and len(modules) > 1:
        return None
    return f"a '{task}' module stack cannot be packed"


def supports_packing(model: Any) -> bool:
    return why_not_packed(model) is None


def packed_forward(model: Any, features: Mapping[str, Any]) -> torch.Tensor:
    """Raw scores `[n]` (before the activation function), float32 on the CPU, of a padded batch
    (`input_ids`, `attention_mask`, optional `token_type_ids`) run as one packed row. A batch
    sentence-transformers already flattened is run as it is.

    Equal to the padded forward pass up to kernel rounding. Callers check `supports_packing` first.
    """
    first = model[0]
    hf = first.auto_model
    config = hf.config
    device = next(hf.parameters()).device
    offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
    packed = pack({k: v for k, v in features.items() if isinstance(v, torch.Tensor)}, offset).to(device)
    if first.transformer_task == "sequence-classification":
        hidden = _encode(hf.base_model, packed, config.model_type)
        logits = _classifier_logits(hf, hidden, packed)
    else:
        hidden = _encode(hf, packed, config.model_type)
        # The modules after the encoder (pooling, dense head) read the padded layout, as they always do.
        state: dict[str, Any] = {
            "input_ids": to_padded(packed.input_ids, packed, fill=config.pad_token_id or 0),
            "attention_mask": to_padded(torch.ones_like(packed.input_ids), packed),
            "token_embeddings": to_padded(hidden, packed),
        }
        for module in list(model)[1:]:
            state = module(state)
        logits = state["scores"]
    return logits.float().reshape(packed.n, -1)[:, 0].cpu()


def _encode(encoder: Any, packed: PackedBatch, model_type: str) -> torch.Tensor:
    """The encoder's last hidden states of the packed row, `[total, hidden]`."""
    kwargs: dict[str, Any] = {
        "input_ids": packed.input_ids[None],
        "position_ids": packed.position_ids[None],
        **packed.attention_kwargs(),
    }
    if packed.token_type_ids is not None and model_type in _TOKEN_TYPE_ENCODERS:
        kwargs["token_type_ids"] = packed.token_type_ids[None]
    return encoder(**kwargs)[0][0]


def _classifier_logits(hf: Any, hidden: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """The transformers classification head on the packed hidden states; each head reads what its own
    forward reads (the first token, or ModernBERT's mean over the sequence)."""
    name = type(hf).__name__
    if name == "BertForSequenceClassification":
        # The pooler reads token 0 of a [batch, seq, hidden] tensor: give it each sequence's CLS alone.
        pooled = hf.bert.pooler(first_tokens(hidden, packed)[:, None])
        return hf.classifier(hf.dropout(pooled))
    if name in ("RobertaForSequenceClassification", "XLMRobertaForSequenceClassification"):
        return hf.classifier(first_tokens(hidden, packed)[:, None])
    if name == "ModernBertForSequenceClassification":
        if hf.config.classifier_pooling == "mean":
            pooled = segment_mean(hidden, packed)
        else:
            pooled = first_tokens(hidden, packed)
        return hf.classifier(hf.drop(hf.head(pooled)))
    raise ValueError(f"{name} has no packed classification head here")


# ---- a reference for the varlen kernel ----------------------------------------------------------
def reference_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """What `flash_attn_varlen_func` computes for an encoder, one sequence at a time with SDPA.

    Query, key and value are `[1, heads, total, head_dim]`; a sliding window keeps keys within
    `sliding_window - 1` positions either side, as transformers sets the flash window. Without packed
    arguments (a padded batch) it is plain SDPA, so one loaded model can run both ways.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if getattr(module, "is_causal", False):
        raise ValueError("the reference varlen attention is for bidirectional encoders only")
    out = torch.empty_like(query)
    for start, end in itertools.pairwise(cu_seq_lens_q.tolist()):
        mask = None
        if sliding_window is not None:
            pos = torch.arange(end - start, device=query.device)
            mask = (pos[:, None] - pos[None, :]).abs() <= sliding_window - 1
        out[:, :, start:end] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            attn_mask=mask,
            scale=scaling,
        )
    return out.transpose(1, 2).contiguous(), None


def register_reference_attention() -> str:
    """Makes `REFERENCE_ATTENTION` a valid `attn_implementation` (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(REFERENCE_ATTENTION, reference_varlen_attention)
    # Padded batches get SDPA's masks.
    AttentionMaskInterface.register(REFERENCE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return REFERENCE_ATTENTION
