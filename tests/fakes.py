"""The one file of test doubles. Each wraps a REAL scorer (no model is faked): they only add
observation (which pairs reached the model, in which batches) and a gate to hold the worker thread,
so deadline, cancellation and drain behaviour can be provoked deterministically."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from sidecar.scoring.base import Measure, Pair, Scorer


class RecordingScorer(Scorer):
    def __init__(self, inner: Scorer, gate: threading.Event | None = None) -> None:
        self.inner = inner
        self.info = inner.info
        self.gate = gate
        self.batches: list[list[Pair]] = []
        self.entered = threading.Event()  # set when a batch has reached the model

    def measure(self, pairs: Sequence[Pair]) -> list[Measure]:
        return self.inner.measure(pairs)

    def score(self, pairs: Sequence[Pair]) -> np.ndarray:
        self.batches.append(list(pairs))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=60)
        return self.inner.score(pairs)

    @property
    def seen(self) -> list[Pair]:
        return [p for b in self.batches for p in b]
