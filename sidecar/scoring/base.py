"""The scorer boundary: one call, `score(pairs) -> floats`, behind which backends swap.

Tokenisation, the forward pass and post-processing are private stages of each backend. The batcher
also asks a scorer to `measure` pairs (tokens after truncation, and whether truncation happened) so it
can pack batches by a token budget.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
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


class Scorer(ABC):
    info: ModelInfo

    @abstractmethod
    def measure(self, pairs: Sequence[Pair]) -> list[Measure]:
        """Token count per pair after truncation; cheap (tokeniser only)."""

    @abstractmethod
    def score(self, pairs: Sequence[Pair]) -> np.ndarray:
        """One float32 score per pair, in order. Called from one worker thread at a time."""

    @property
    def accepts_instruction(self) -> bool:
        return self.info.accepts_instruction
