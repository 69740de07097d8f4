"""Training examples for a reranker from a BEIR training split: positives from the qrels, negatives mined.

Negatives come from three sources, in this order, and never include a document judged relevant to the query:
- hard negatives from the first stage (BM25, optionally the embedding model): its top `depth` hits after
  skipping the first `skip_top` ranks (the top of a first stage is dense with unjudged relevant documents,
  "false negatives", which teach the model the wrong thing);
- random negatives drawn from the whole corpus (easy ones, which keep the scores calibrated).

The dev split is carved from the training queries (never from the test split) with a seeded shuffle.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.progress import Progress

from sidecar.eval.datasets import Dataset
from sidecar.eval.first_stage import FirstStage, Hit, advance, progress_task


@dataclass(frozen=True)
class MiningConfig:
    depth: int = 30
    skip_top: int = 3
    hard_negatives: int = 3
    embedding_negatives: int = 0
    random_negatives: int = 1

    def __post_init__(self) -> None:
        if self.skip_top < 0 or self.depth < 1:
            raise ValueError("depth must be at least 1 and skip_top at least 0")
        if self.skip_top >= self.depth:
            raise ValueError(f"skip_top={self.skip_top} leaves nothing to mine in the top depth={self.depth}")
        if min(self.hard_negatives, self.embedding_negatives, self.random_negatives) < 0:
            raise ValueError("negative counts cannot be negative")
        if self.hard_negatives + self.embedding_negatives + self.random_negatives == 0:
            raise ValueError("ask for at least one negative per query (hard, embedding or random)")


@dataclass(frozen=True)
class Example:
    qid: str
    doc_id: str
    label: int  # 1 relevant, 0 negative
    source: str  # "qrels", "bm25", "embedding", "random"


@dataclass
class MinedData:
    examples: list[Example]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def positives(self) -> int:
        return sum(e.label for e in self.examples)

    @property
    def negatives(self) -> int:
        return len(self.examples) - self.positives

    def negatives_per_positive(self) -> float:
        return self.negatives / max(1, self.positives)


def split_dev(qids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, dev) query ids: a seeded shuffle of `qids`, `fraction` of them (at least one) for dev."""
    if not 0 < fraction < 1:
        raise ValueError(f"dev fraction must be between 0 and 1, got {fraction}")
    if len(qids) < 2:
        raise ValueError("need at least two training queries to carve out a dev split")
    shuffled = sorted(qids)
    random.Random(seed).shuffle(shuffled)
    n_dev = max(1, round(len(shuffled) * fraction))
    dev = set(shuffled[:n_dev])
    # Keep the qrels file order inside each split, so slices and logs read naturally.
    return [q for q in qids if q not in dev], [q for q in qids if q in dev]


def relevant(qrels: dict[str, int]) -> set[str]:
    return {d for d, r in qrels.items() if r > 0}


def pick_negatives(
    hits: Sequence[Hit], exclude: set[str], *, skip_top: int, depth: int, count: int
) -> list[str]:
    """The `count` highest-ranked hits below rank `skip_top` within the top `depth`, minus `exclude`."""
    out: list[str] = []
    for hit in hits[skip_top:depth]:
        if len(out) == count:
            break
        if hit.doc_id not in exclude:
            out.append(hit.doc_id)
    return out


def mine(
    dataset: Dataset,
    qids: Sequence[str],
    first_stage: FirstStage,
    config: MiningConfig,
    *,
    seed: int = 0,
    embedding_stage: FirstStage | None = None,
    progress: Progress | None = None,
) -> MinedData:
    """Positives and negatives for each of `qids` (queries of `dataset`'s training split)."""
    rng = random.Random(seed)
    corpus_ids = list(dataset.corpus)
    examples: list[Example] = []
    counts = {"qrels": 0, "bm25": 0, "embedding": 0, "random": 0}
    task = progress_task(progress, f"mining negatives ({len(qids)} queries)", len(qids))

    def add(qid: str, doc_ids: list[str], label: int, source: str, taken: set[str]) -> None:
        for d in doc_ids:
            examples.append(Example(qid, d, label, source))
            taken.add(d)
            counts[source] += 1

    for qid in qids:
        qrels = dataset.qrels.get(qid, {})
        positives = sorted(relevant(qrels) & dataset.corpus.keys())
        if not positives:
            advance(progress, task)
            continue
        # Anything judged relevant is off limits as a negative, whichever source proposes it.
        taken: set[str] = set(relevant(qrels))
        add(qid, positives, 1, "qrels", set())
        query = dataset.queries[qid]
        sources: list[tuple[str, FirstStage | None, int]] = [
            ("bm25", first_stage, config.hard_negatives),
            ("embedding", embedding_stage, config.embedding_negatives),
        ]
        for name, stage, count in sources:
            if stage is None or count == 0:
                continue
            hits = stage.search(query, config.depth)
            add(
                qid,
                pick_negatives(hits, taken, skip_top=config.skip_top, depth=config.depth, count=count),
                0,
                name,
                taken,
            )
        add(qid, _random_negatives(rng, corpus_ids, taken, config.random_negatives), 0, "random", taken)
        advance(progress, task)
    return MinedData(examples, counts)


def _random_negatives(rng: random.Random, corpus_ids: list[str], taken: set[str], count: int) -> list[str]:
    out: list[str] = []
    free = len(corpus_ids) - len(taken)
    while len(out) < min(count, free):
        d = corpus_ids[rng.randrange(len(corpus_ids))]
        if d not in taken and d not in out:
            out.append(d)
    return out


def as_columns(
    data: MinedData, dataset: Dataset, text: Callable[[Any], str] | None = None
) -> dict[str, list[Any]]:
    """Columns for a `datasets.Dataset`: query, document text, float label (what BCE trains on)."""
    to_text = text or (lambda doc: doc.joined())
    return {
        "query": [dataset.queries[e.qid] for e in data.examples],
        "document": [to_text(dataset.corpus[e.doc_id]) for e in data.examples],
        "label": [float(e.label) for e in data.examples],
    }
