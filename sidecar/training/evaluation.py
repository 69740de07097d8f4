"""Dev-split evaluation during fine-tuning: rerank each dev query's first-stage top-k and score it with
trec_eval measures (the evaluator's own `metrics` module), next to the first stage's order of the same list.

It is a sentence-transformers evaluator, so the trainer calls it each epoch and keeps the checkpoint with the
best dev nDCG@10. Only training-split queries ever reach it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sentence_transformers.base.evaluation.evaluator import BaseEvaluator

from sidecar.eval.metrics import evaluate_scored

METRICS = ("ndcg@10", "mrr@10", "map@100")


@dataclass(frozen=True)
class DevQuery:
    qid: str
    query: str
    # First-stage candidates, best first: (doc id, text the model reads, first-stage score).
    candidates: list[tuple[str, str, float]]


class DevRerankEvaluator(BaseEvaluator):
    def __init__(
        self,
        queries: Sequence[DevQuery],
        qrels: dict[str, dict[str, int]],
        *,
        name: str = "dev",
        batch_size: int = 32,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__()
        self.queries = list(queries)
        self.qrels = qrels
        self.name = name
        self.batch_size = batch_size
        self.show_progress_bar = show_progress_bar
        self.primary_metric = "ndcg@10"
        self.history: list[dict[str, Any]] = []

    @property
    def qids(self) -> list[str]:
        return [q.qid for q in self.queries]

    def first_stage_metrics(self) -> dict[str, float]:
        return self.metrics_for({q.qid: [s for _, _, s in q.candidates] for q in self.queries})

    def rerank_scores(self, model: Any) -> dict[str, list[float]]:
        """The model's score for every candidate of every dev query, in candidate order."""
        pairs = [(q.query, text) for q in self.queries for _, text, _ in q.candidates]
        flat = model.predict(
            pairs, batch_size=self.batch_size, show_progress_bar=self.show_progress_bar, convert_to_numpy=True
        )
        out: dict[str, list[float]] = {}
        i = 0
        for q in self.queries:
            out[q.qid] = [float(s) for s in flat[i : i + len(q.candidates)]]
            i += len(q.candidates)
        return out

    def metrics_for(self, scores: dict[str, list[float]]) -> dict[str, float]:
        """Dev metrics with each query's candidates ranked by `scores` (ties keep first-stage order)."""
        lists = {q.qid: ([d for d, _, _ in q.candidates], scores[q.qid]) for q in self.queries}
        return evaluate_scored(self.qrels, lists, METRICS)

    def __call__(
        self, model: Any, output_path: str | None = None, epoch: int = -1, steps: int = -1
    ) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            scores = self.rerank_scores(model)
        finally:
            model.train(was_training)
        metrics = self.metrics_for(scores)
        self.history.append({"epoch": epoch, "steps": steps, **metrics})
        metrics = self.prefix_name_to_metrics(metrics, self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics
