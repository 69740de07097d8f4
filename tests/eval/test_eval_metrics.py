"""Metrics against values worked out by hand on a tiny run, trec_eval's ordering rules, the paired tests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sidecar.eval import metrics as m

# qA: graded judgments, relevant documents at ranks 2 (rel 1) and 3 (rel 2).
# qB: the only relevant document at rank 11 (outside every @10 cut, inside @100).
# qC: judged but nothing retrieved: counts as 0 everywhere (trec_eval -c).
QRELS = {"qA": {"a": 1, "c": 2, "n": 0}, "qB": {"x": 1}, "qC": {"m": 1}}
RUN: m.Run = {
    "qA": [("b", 3.0), ("a", 2.0), ("c", 1.0), ("d", 0.5)],
    "qB": [*((f"y{i}", 20.0 - i) for i in range(10)), ("x", 1.0)],
}
QIDS = ["qA", "qB", "qC"]

# Worked by hand: DCG = 1/log2(3) + 2/log2(4); ideal DCG = 2/log2(2) + 1/log2(3).
NDCG_QA = (1 / math.log2(3) + 2 / math.log2(4)) / (2 + 1 / math.log2(3))
AP_QA = (1 / 2 + 2 / 3) / 2  # precision at each relevant document's rank, over 2 relevant
AP_QB = (1 / 11) / 1


def test_per_query_values_match_hand_computation() -> None:
    pq = m.evaluate(QRELS, RUN, QIDS, [*m.DEFAULT_METRICS, "recall@1000"])
    assert pq["ndcg@10"] == pytest.approx({"qA": NDCG_QA, "qB": 0.0, "qC": 0.0}, abs=1e-6)
    assert pq["mrr@10"] == pytest.approx({"qA": 0.5, "qB": 0.0, "qC": 0.0})
    assert pq["map@100"] == pytest.approx({"qA": AP_QA, "qB": AP_QB, "qC": 0.0}, abs=1e-6)
    assert pq["recall@10"] == pytest.approx({"qA": 1.0, "qB": 0.0, "qC": 0.0})
    assert pq["recall@100"] == pytest.approx({"qA": 1.0, "qB": 1.0, "qC": 0.0})
    assert pq["recall@1000"] == pytest.approx({"qA": 1.0, "qB": 1.0, "qC": 0.0})


def test_means_divide_by_every_judged_query() -> None:
    agg = m.aggregate(m.evaluate(QRELS, RUN, QIDS))
    assert agg["ndcg@10"] == pytest.approx(NDCG_QA / 3, abs=1e-6)  # 0.2066
    assert agg["mrr@10"] == pytest.approx(0.5 / 3)
    assert agg["map@100"] == pytest.approx((AP_QA + AP_QB) / 3, abs=1e-6)
    assert agg["recall@10"] == pytest.approx(1 / 3)
    assert agg["recall@100"] == pytest.approx(2 / 3)


def test_unknown_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="supported"):
        m.evaluate(QRELS, RUN, QIDS, ["p@5"])


def test_ties_follow_trec_eval_and_order_scores_makes_position_authoritative() -> None:
    qrels = {"t": {"a": 1}}
    # Eleven equal scores: trec_eval breaks ties by document id, descending, so "a" sorts after z9..z0.
    tied = [("a", 1.0), *((f"z{i}", 1.0) for i in range(10))]
    assert m.trec_order(tied)[0][0] == "z9"
    assert m.trec_order(tied)[-1][0] == "a"
    assert m.evaluate(qrels, {"t": tied}, ["t"], ["mrr@10"])["mrr@10"]["t"] == 0.0
    strict, changed = m.order_scores(tied)
    assert changed == 10
    assert [d for d, _ in m.trec_order(strict)] == [d for d, _ in tied]
    assert strict[0] == ("a", 1.0)  # the first score is kept as given
    assert m.evaluate(qrels, {"t": strict}, ["t"], ["mrr@10"])["mrr@10"]["t"] == 1.0


def test_order_scores_keeps_scores_that_already_decrease() -> None:
    ranking = [("a", 0.9), ("b", 0.5), ("c", 0.7), ("d", -1.0)]
    strict, changed = m.order_scores(ranking)
    assert changed == 1
    assert strict[0] == ("a", 0.9) and strict[1] == ("b", 0.5) and strict[3] == ("d", -1.0)
    assert strict[2][0] == "c" and -1.0 < strict[2][1] < 0.5


def test_randomization_test_exact_case() -> None:
    # Differences 1, 2, 3: of the 8 sign assignments only +++ and --- reach |sum| 6, so p = 2/8.
    assert m.randomization_test([0, 0, 0], [1, 2, 3]) == pytest.approx(0.25)
    # Differences 1, 1: ++ and -- reach |sum| 2 out of 4 assignments.
    assert m.randomization_test([0, 0], [1, 1]) == pytest.approx(0.5)
    assert m.randomization_test([0.3, 0.5], [0.3, 0.5]) == 1.0  # identical systems
    assert m.randomization_test([], []) == 1.0


def test_randomization_test_sampled_is_seeded_and_sensible() -> None:
    rng = np.random.default_rng(1)
    a = rng.random(40)
    b = a + 0.2  # every query better: only the all-plus / all-minus assignments reach the observed sum
    p = m.randomization_test(a, b, trials=2000, seed=3)
    assert p == pytest.approx(1 / 2001)
    noise = a + rng.normal(0, 0.1, 40)
    p1 = m.randomization_test(a, noise, trials=2000, seed=7)
    assert p1 == m.randomization_test(a, noise, trials=2000, seed=7)  # reproducible
    assert p1 > 0.01


def test_paired_t_test_matches_the_closed_form() -> None:
    # Differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 2 sqrt 3 with 2 degrees of freedom, where the
    # two-sided p-value has the closed form 1 - t / sqrt(t^2 + 2).
    t, p = m.paired_t_test([0, 0, 0], [1, 2, 3])
    assert t == pytest.approx(2 * math.sqrt(3))
    assert p == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14))  # 0.0742
    assert m.paired_t_test([1.0], [2.0]) == (None, None)
    assert m.paired_t_test([0, 0], [1, 1]) == (None, None)  # zero variance: undefined


def test_compare_counts_wins_losses_ties() -> None:
    a = {"q1": 0.5, "q2": 0.5, "q3": 0.2, "q4": 0.0}
    b = {"q1": 0.7, "q2": 0.5, "q3": 0.1, "q4": 0.4}
    c = m.compare(a, b, "ndcg@10")
    assert (c.wins, c.losses, c.ties) == (2, 1, 1)
    assert c.mean_a == pytest.approx(0.3)
    assert c.mean_b == pytest.approx(0.425)
    assert c.delta == pytest.approx(0.125)
    assert c.randomization_p_value == m.randomization_test([0.5, 0.5, 0.2, 0.0], [0.7, 0.5, 0.1, 0.4])


def test_latency_summary_percentiles() -> None:
    s = m.latency_summary([0.001, 0.002, 0.003, 0.004, 0.010])
    assert s["count"] == 5
    assert s["p50_ms"] == pytest.approx(3.0)
    assert s["p95_ms"] == pytest.approx(8.8)  # linear: 4 + 0.8 * (10 - 4)
    assert s["p99_ms"] == pytest.approx(9.76)
    assert s["mean_ms"] == pytest.approx(4.0)
    assert s["max_ms"] == pytest.approx(10.0)
    assert m.latency_summary([]) == {"count": 0}
