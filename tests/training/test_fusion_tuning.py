"""Choosing fusion weights: the grid search against hand-computed cases, and which queries it may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.eval import datasets
from sidecar.fusion import NO_FUSION, FusionMethod, FusionSpec, Normalization
from sidecar.training.fusion_tuning import (
    Candidates,
    FusionTuningError,
    choose,
    evaluate_spec,
    select_queries,
    tune_fusion,
)

QRELS = {"q1": {"d1": 1}, "q2": {"e2": 1}}


def test_a_perfect_reranker_keeps_no_fusion() -> None:
    # The reranker puts the relevant document first for both queries; BM25 does not for q2.
    per_query = {
        "q1": Candidates(["d1", "d2", "d3"], [3.0, 2.0, 1.0], [0.9, 0.2, 0.1]),
        "q2": Candidates(["e1", "e2", "e3"], [3.0, 2.0, 1.0], [0.1, 0.8, 0.3]),
    }
    best, grid = choose(per_query, QRELS)
    assert best == NO_FUSION  # ties go to no fusion, the simplest choice
    assert dict(grid)[NO_FUSION]["ndcg@10"] == pytest.approx(1.0)
    # Pure first-stage order (alpha 0): q1 perfect, q2 relevant at rank 2 -> nDCG 1/log2(3).
    bm25_only = evaluate_spec(FusionSpec(FusionMethod.BLEND, alpha=0.0), per_query, QRELS)
    assert bm25_only["ndcg@10"] == pytest.approx((1.0 + 1 / 1.5849625007211562) / 2)
    assert bm25_only["mrr@10"] == pytest.approx((1.0 + 0.5) / 2)


def test_blend_weight_is_the_largest_alpha_that_keeps_the_best_score() -> None:
    # BM25 is right (d1 first), the reranker has the order exactly reversed. With min-max:
    # norm(first) = [1, .5, 0], norm(rerank) = [0, .5, 1], so fused = [1 - a, .5, a]. d1 stays on top while
    # a < .5; at a = .5 all three tie at .5 and the stable sort keeps first-stage order (d1 still first);
    # above .5 d3 wins. The grid tries alpha from 1 down, so 0.5 is the first to reach nDCG 1.
    per_query = {"q1": Candidates(["d1", "d2", "d3"], [3.0, 2.0, 1.0], [0.0, 0.5, 1.0])}
    best, grid = choose(per_query, {"q1": {"d1": 1}})
    assert best == FusionSpec(FusionMethod.BLEND, alpha=0.5, normalization=Normalization.MINMAX)
    scores = {spec: m["ndcg@10"] for spec, m in grid}
    assert scores[NO_FUSION] == pytest.approx(0.5)  # relevant at rank 3: 1/log2(4)
    assert scores[FusionSpec(FusionMethod.BLEND, alpha=0.55)] == pytest.approx(0.5)
    # RRF, ranks (first stage, reranker): d1 (1, 3) and d3 (3, 1) both get 1/61 + 1/63 = 0.032266, above
    # d2's (2, 2) 2/62 = 0.032258; the tie keeps first-stage order, so d1 leads.
    assert scores[FusionSpec(FusionMethod.RRF)] == pytest.approx(1.0)


def _train_dir(tmp_path: Path) -> Path:
    from tests.eval.beir_helpers import write_beir

    return write_beir(tmp_path / "beir", split="train")


def test_queries_are_the_model_dev_split_unless_all_train(tmp_path: Path) -> None:
    data = datasets.load(_train_dir(tmp_path), split="train")
    model = tmp_path / "model"
    model.mkdir()
    assert select_queries(data, model, all_train=False, max_queries=None) == (
        ["q1", "q2", "q3"],
        "every train-split query",
    )
    (model / "dev_qids.txt").write_text("q2\n")
    qids, label = select_queries(data, model, all_train=False, max_queries=None)
    assert qids == ["q2"] and "dev_qids.txt" in label
    assert select_queries(data, model, all_train=True, max_queries=2)[0] == ["q1", "q2"]
    (model / "dev_qids.txt").write_text("q2\nq99\n")
    with pytest.raises(FusionTuningError, match="not in"):
        select_queries(data, model, all_train=False, max_queries=None)


def test_refuses_to_write_into_the_packaged_model(tmp_path: Path) -> None:
    with pytest.raises(FusionTuningError, match="--out"):
        tune_fusion(model=None, data=_train_dir(tmp_path))


def test_out_names_a_directory_unless_it_ends_in_json(tmp_path: Path) -> None:
    from sidecar.training.fusion_tuning import output_path

    assert output_path(None, tmp_path / "new-dir") == tmp_path / "new-dir" / "fusion.json"
    assert output_path(None, tmp_path / "weights.json") == tmp_path / "weights.json"
    assert output_path(tmp_path / "model", None) == tmp_path / "model" / "fusion.json"
