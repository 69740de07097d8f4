"""The scorer boundary: one call, `score(pairs) -> floats`, behind which backends swap.

Tokenisation, the forward pass and post-processing are private stages of each backend. The service
asks a scorer to `measure` pairs in its tokenize threads (tokens after truncation, whether truncation
happened, and, where the backend can, the encoding the model will read), so the batcher can pack
batches by a token budget and the model thread is handed the encodings instead of tokenizing again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from sidecar.types import ModelInfo


class Pair(NamedTuple):
    query: str
    document: str
    instruction: str | None = None


class Measure(NamedTuple):
    tokens: int  # tokens the model will see (after truncation)
    truncated: bool
    # The pair cut down to what the model can read (see `clip_text`); None when nothing was cut. The
    # service scores this one, so no stage after measuring holds or tokenizes a document whole.
    clipped: Pair | None = None
    # What the model reads of the pair, made once in the tokenize threads (opaque outside the scorer
    # that made it; `sidecar.scoring.encodings` for the sentence-transformers scorers). The batcher
    # hands these to `score` with the pairs; None where the backend tokenizes in `score` itself.
    encoding: object | None = None


# Clipping reads a document in growing prefixes, starting at this many characters per token it needs:
# natural text runs 3-6 characters per token, so one step almost always suffices.
CLIP_CHARS_PER_TOKEN = 8
# A prefix is kept only when it holds this many tokens more than needed, so the word cut at its end
# (which can tokenize differently from the whole word) lies beyond what the model reads.
CLIP_MARGIN_TOKENS = 16
_WHITESPACE = (" ", "\n", "\t", "\r")


def clip_text(text: str, tokens: int, count: Callable[[str], int]) -> str:
    """A prefix of `text` that tokenizes (by `count`) to more than `tokens` tokens, or `text` itself.

    A model that truncates at `tokens` reads the same tokens from the prefix as from the whole text
    (pre-tokenizers split on whitespace and the cut falls on one, with a margin), so scores do not
    change, while memory and tokenizer time stay bounded by `tokens` instead of by the request. Work is
    at most about 4/3 of tokenizing the whole text, reached only by text that yields almost no tokens.
    """
    chars = tokens * CLIP_CHARS_PER_TOKEN
    while len(text) > chars:
        cut = max(text.rfind(c, chars // 2, chars) for c in _WHITESPACE)
        prefix = text[: cut if cut > 0 else chars]
        if count(prefix) > tokens + CLIP_MARGIN_TOKENS:
            return prefix
        chars *= 4
    return text


class Scorer(ABC):
    info: ModelInfo

    @abstractmethod
    def measure(self, pairs: Sequence[Pair]) -> list[Measure]:
        """Token count per pair after truncation; cheap (tokeniser only)."""

    @abstractmethod
    def score(
        self, pairs: Sequence[Pair], encodings: Sequence[object] | None = None, *, first_pass: bool = False
    ) -> np.ndarray:
        """One float32 score per pair, in order. Called from one worker thread at a time.

        `encodings`: the pairs' `Measure.encoding`s from this scorer's `measure`; with them the model
        thread only stacks them into tensors (pre), runs the model (core) and post-processes (post).
        A scorer with a cascade (`cascade_depth` > 0) also takes `first_pass=True`: the same pairs
        through its fast first-pass engine.
        """

    # A cascade (settings.cascade): documents per request the served precision re-scores after a fast
    # first pass over all of them; 0 when the scorer has none.
    cascade_depth: int = 0

    # ---- long documents (sidecar/windows.py); backends that cannot window return None ----------
    def window_budget(self, pair: Pair) -> int | None:
        """Document tokens that fit beside `pair`'s query (and template) within the model's limit."""
        return None

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of each token of `text` (no special tokens)."""
        raise NotImplementedError

    @property
    def accepts_instruction(self) -> bool:
        return self.info.accepts_instruction
