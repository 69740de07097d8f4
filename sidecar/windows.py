"""Long documents (setting long_documents=windows): a document longer than the model reads is split into
overlapping token windows, each window is scored as its own pair, and the document gets one score.

The service asks `split` for the windows of the pairs measuring found truncated, scores every window
through the batcher (so its token budget counts windows), and folds the scores back with `aggregate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sidecar.scoring.base import Pair, Scorer, clip_text

AGGREGATES = ("max", "first", "mean_top2")


@dataclass(frozen=True)
class WindowPolicy:
    overlap: int
    max_windows: int
    aggregate: str

    def cache_tag(self) -> str:
        """What a windowed score depends on beyond the pair (the score cache's key includes it)."""
        return f"windows/{self.overlap}/{self.max_windows}/{self.aggregate}"


class Windows(NamedTuple):
    """One document's windows: character spans into the document text, and whether text remains past
    the last one (the cap on windows was reached)."""

    spans: list[tuple[int, int]]
    cut: bool


class Passage(NamedTuple):
    score: float
    start: int  # character offsets of the winning window in the text the model read
    end: int
    windows: int
    truncated: bool


def plan(offsets: Sequence[tuple[int, int]], budget: int, overlap: int, max_windows: int) -> Windows:
    """Windows of at most `budget` tokens over a text whose tokens lie at `offsets` (character spans),
    consecutive windows sharing about `overlap` tokens (at most half a window, so each one moves on).

    Cuts fall between words where one lies in the last half of a window: a token glued to the one before
    it (a word piece, punctuation) stays with it, so a window's text tokenizes back to the same tokens
    and no word is read in halves.
    """
    n = len(offsets)
    if n == 0:
        return Windows([(0, 0)], False)
    budget = max(1, budget)
    overlap = min(overlap, budget // 2)

    def glued(i: int) -> bool:
        return 0 < i < n and offsets[i][0] == offsets[i - 1][1]

    def back_to_word(i: int, floor: int) -> int:
        j = i
        while glued(j) and j > floor:
            j -= 1
        return i if glued(j) else j

    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        end = back_to_word(min(start + budget, n), start + budget // 2)
        spans.append((offsets[start][0], offsets[end - 1][1]))
        if end >= n:
            return Windows(spans, False)
        if len(spans) == max_windows:
            return Windows(spans, True)
        start = back_to_word(max(end - overlap, start + 1), start + 1)


def split(scorer: Scorer, pairs: Sequence[Pair], policy: WindowPolicy) -> list[Windows | None]:
    """Each pair's windows, or None where the scorer cannot window it (it is then truncated as before).

    Only as much of a document as `policy.max_windows` windows can cover is tokenized (`clip_text`), so
    memory and tokenizer work per document stay bounded however long it is.
    """
    out: list[Windows | None] = []
    for p in pairs:
        budget = scorer.window_budget(p)
        if budget is None or budget < 1:
            out.append(None)
            continue
        text = clip_text(p.document, budget * policy.max_windows, scorer.count_tokens)
        w = plan(scorer.token_offsets(text), budget, policy.overlap, policy.max_windows)
        # Text past the clipped prefix was never read.
        out.append(w._replace(cut=w.cut or text is not p.document))
    return out


def aggregate(scores: Sequence[float], how: str) -> tuple[float, int]:
    """A document's score from its windows' scores, and the window reported as the winner."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    if how == "first":
        return float(scores[0]), 0
    if how == "mean_top2":
        top = sorted(scores, reverse=True)[:2]
        return sum(float(s) for s in top) / len(top), best
    return float(scores[best]), best
