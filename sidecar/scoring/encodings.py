"""Token ids made once in the tokenize threads and stacked into model inputs in the model thread.

A pair's `TokenIds` are what the tokenizer gives for it with truncation at the model's limit (special
tokens in), held as compact numpy arrays while the pair waits in the queue; `collate` pads a batch of
them exactly as the tokenizer's own padding would (pad id, pad type id, padding side), so the model
reads the same tensors as from `preprocess` of the same texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np


class TokenIds(NamedTuple):
    input_ids: np.ndarray  # int32: vocabularies stay far below 2**31
    token_type_ids: np.ndarray | None  # int8 segment ids, for models that read them

    def __len__(self) -> int:  # type: ignore[override]
        return len(self.input_ids)


class Padding(NamedTuple):
    """How a tokenizer pads a batch."""

    pad_id: int
    pad_type_id: int
    left: bool

    @classmethod
    def of(cls, tokenizer: Any) -> Padding:
        return cls(
            int(tokenizer.pad_token_id or 0),
            int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
            getattr(tokenizer, "padding_side", "right") == "left",
        )


def token_ids(encoded: Any) -> list[TokenIds]:
    """Per row of a tokenizer's unpadded batch output (`BatchEncoding` of lists), its `TokenIds`."""
    types = encoded.get("token_type_ids")
    return [
        TokenIds(
            np.asarray(ids, dtype=np.int32),
            np.asarray(types[i], dtype=np.int8) if types is not None else None,
        )
        for i, ids in enumerate(encoded["input_ids"])
    ]


def collate(encodings: Sequence[TokenIds], padding: Padding) -> dict[str, Any]:
    """The batch's `input_ids`, `attention_mask` (and `token_type_ids`) as int64 torch tensors, padded
    to the longest row."""
    import torch

    n = len(encodings)
    width = max(len(e.input_ids) for e in encodings)
    ids = np.full((n, width), padding.pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    with_types = encodings[0].token_type_ids is not None
    types = np.full((n, width), padding.pad_type_id, dtype=np.int64) if with_types else None
    for row, e in enumerate(encodings):
        k = len(e.input_ids)
        span = slice(width - k, width) if padding.left else slice(0, k)
        ids[row, span] = e.input_ids
        mask[row, span] = 1
        if types is not None and e.token_type_ids is not None:
            types[row, span] = e.token_type_ids
    features = {"input_ids": torch.from_numpy(ids)}
    if types is not None:
        features["token_type_ids"] = torch.from_numpy(types)
    features["attention_mask"] = torch.from_numpy(mask)
    return features
