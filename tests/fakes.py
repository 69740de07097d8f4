"""The one file of test doubles. Each wraps a REAL scorer (no model is faked): they only add
observation (which pairs reached the model, in which batches) and a gate to hold the worker thread,
so deadline, cancellation and drain behaviour can be provoked deterministically."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from sidecar.scoring.base import Measure, Pair, Scorer


class BatchGate:
    """A gate that lets exactly the batches it is told through (`allow`), holding the rest in the model
    thread; `open` lets everything through (teardown)."""

    def __init__(self) -> None:
        self._permits = threading.Semaphore(0)

    def allow(self, batches: int) -> None:
        self._permits.release(batches)

    def open(self) -> None:
        self._permits.release(10_000)

    def wait(self, timeout: float | None = None) -> bool:
        return self._permits.acquire(timeout=timeout)


class RecordingScorer(Scorer):
    def __init__(self, inner: Scorer, gate: threading.Event | BatchGate | None = None) -> None:
        self.inner = inner
        self.info = inner.info
        self.gate = gate
        self.batches: list[list[Pair]] = []
        self.first_pass_batches: list[bool] = []  # per batch: a cascade's first pass
        self.entered = threading.Event()  # set when a batch has reached the model
        self.cascade_depth = inner.cascade_depth

    def measure(self, pairs: Sequence[Pair]) -> list[Measure]:
        return self.inner.measure(pairs)

    def window_budget(self, pair: Pair) -> int | None:
        return self.inner.window_budget(pair)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return self.inner.token_offsets(text)

    def score(
        self, pairs: Sequence[Pair], encodings: Sequence[object] | None = None, *, first_pass: bool = False
    ) -> np.ndarray:
        self.batches.append(list(pairs))
        self.first_pass_batches.append(first_pass)
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=60)
        if first_pass:
            return self.inner.score(pairs, encodings, first_pass=True)
        return self.inner.score(pairs, encodings)

    @property
    def seen(self) -> list[Pair]:
        return [p for b in self.batches for p in b]


class TokenizerSpy:
    """Wraps a REAL Hugging Face tokenizer and records how many characters each call was given: one
    call is one uninterruptible step of tokenizer work."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.call_chars: list[int] = []

    def __call__(self, first, second=None, **kwargs):  # type: ignore[no-untyped-def]
        texts = [first] if isinstance(first, str) else list(first)
        if second is not None:
            texts += [second] if isinstance(second, str) else list(second)
        self.call_chars.append(sum(len(t) for t in texts))
        return self.inner(first, second, **kwargs)  # type: ignore[operator]


class SlowMeasureScorer(RecordingScorer):
    """A REAL scorer whose tokenizing (measure) waits on `measure_gate`, as a flood of long documents on
    busy tokenizer threads would."""

    def __init__(self, inner: Scorer, measure_gate: threading.Event) -> None:
        super().__init__(inner)
        self.measure_gate = measure_gate

    def measure(self, pairs: Sequence[Pair]) -> list[Measure]:
        self.measure_gate.wait(timeout=60)
        return super().measure(pairs)


class FailingScorer(RecordingScorer):
    """A REAL scorer whose batches fail (raise) whenever they hold a pair of query `poison`."""

    def __init__(self, inner: Scorer, poison: str) -> None:
        super().__init__(inner)
        self.poison = poison

    def score(
        self, pairs: Sequence[Pair], encodings: Sequence[object] | None = None, *, first_pass: bool = False
    ) -> np.ndarray:
        if any(p.query == self.poison for p in pairs):
            self.batches.append(list(pairs))
            raise RuntimeError("injected scorer failure")
        return super().score(pairs, encodings, first_pass=first_pass)


def break_batcher_loop(batcher: object) -> None:
    """Make the batcher's loop itself raise at its next step, as an unforeseen bug would (the loop
    code, not the scorer: scorer failures are caught per batch)."""

    def broken(*args: object) -> list:
        raise RuntimeError("injected batcher loop failure")

    batcher._next_batch = broken  # type: ignore[attr-defined]


class InfoFailingScorer(RecordingScorer):
    """A REAL scorer whose `info` raises once `fail` is set, as an unforeseen bug outside the scoring path
    would; the exception text holds a detail no client may read."""

    SECRET = "/srv/secret-model-path"

    def __init__(self, inner: Scorer) -> None:
        self.fail = False
        super().__init__(inner)

    @property  # type: ignore[override]
    def info(self):  # type: ignore[no-untyped-def]
        if self.fail:
            raise RuntimeError(f"injected failure reading {self.SECRET}")
        return self.inner.info

    @info.setter
    def info(self, value: object) -> None:
        pass  # RecordingScorer's copy is not needed: the inner scorer's is read
