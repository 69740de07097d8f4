"""Quality and latency statistics: trec_eval measures via pytrec_eval, per-query comparison, paired tests.

A run is `{qid: [(doc_id, score), ...]}`. Like trec_eval, the evaluation orders each query's documents by
score (descending, ties broken by document id, descending) rather than by list position; callers that need a
given order evaluated as such must hand over scores that decrease strictly along it (see `order_scores`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

Run = dict[str, list[tuple[str, float]]]
Qrels = Mapping[str, Mapping[str, int]]

# Our name -> (pytrec_eval measure to request, key in its output, cutoff applied to the run first or None).
# MRR@10 has no trec_eval cut measure, so the run is cut to 10 and `recip_rank` computed on that.
_MEASURES: dict[str, tuple[str, str, int | None]] = {
    "ndcg@10": ("ndcg_cut.10", "ndcg_cut_10", None),
    "mrr@10": ("recip_rank", "recip_rank", 10),
    "map@100": ("map_cut.100", "map_cut_100", None),
    "recall@10": ("recall.10", "recall_10", None),
    "recall@100": ("recall.100", "recall_100", None),
    "recall@1000": ("recall.1000", "recall_1000", None),
}
DEFAULT_METRICS = ("ndcg@10", "mrr@10", "map@100", "recall@10", "recall@100")
SUPPORTED_METRICS = tuple(_MEASURES)


def trec_order(ranking: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """The order trec_eval reads a query's run in: score descending, then document id descending."""
    return sorted(ranking, key=lambda hit: (hit[1], hit[0]), reverse=True)


def order_scores(ranking: Sequence[tuple[str, float]]) -> tuple[list[tuple[str, float]], int]:
    """Make scores decrease strictly along `ranking`, changing only those that do not; (ranking, changed).

    A reranked list is authoritative as an *order*; when two hits tie (or a fallback hit carries a score from
    another scale), the later one is nudged just below its predecessor, so every other score stays as the
    model produced it while trec_eval, reading the scores, sees exactly this order. trec_eval holds scores in
    single precision, so "strictly" is judged in float32: doubles that differ only beyond it would tie there.
    """
    out: list[tuple[str, float]] = []
    changed = 0
    prev = np.float32(np.inf)
    for doc_id, score in ranking:
        s = float(score)
        s32 = np.float32(s)
        if not s32 < prev:
            s32 = np.nextafter(prev, np.float32(-np.inf))
            s = float(s32)
            changed += 1
        out.append((doc_id, s))
        prev = s32
    return out, changed


def evaluate(
    qrels: Qrels, run: Run, qids: Sequence[str], metrics: Sequence[str] = DEFAULT_METRICS
) -> dict[str, dict[str, float]]:
    """Per-query values `{metric: {qid: value}}` over exactly `qids`.

    A query with no retrieved documents scores 0 (trec_eval's `-c`), so a system cannot gain by returning
    nothing for hard queries; queries without relevant judgments are the caller's to exclude.
    """
    import pytrec_eval

    unknown = [m for m in metrics if m not in _MEASURES]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; supported: {', '.join(SUPPORTED_METRICS)}")
    sub_qrels = {q: {d: int(r) for d, r in qrels[q].items()} for q in qids if q in qrels}
    out: dict[str, dict[str, float]] = {m: dict.fromkeys(qids, 0.0) for m in metrics}
    by_cut: dict[int | None, list[str]] = {}
    for m in metrics:
        by_cut.setdefault(_MEASURES[m][2], []).append(m)
    for cut, names in by_cut.items():
        scored: dict[str, dict[str, float]] = {}
        for q in qids:
            ranking = run.get(q) or []
            if cut is not None:
                ranking = trec_order(ranking)[:cut]
            if ranking:
                scored[q] = {d: float(s) for d, s in ranking}
        if not scored or not sub_qrels:
            continue
        evaluator = pytrec_eval.RelevanceEvaluator(sub_qrels, {_MEASURES[m][0] for m in names})
        results = evaluator.evaluate(scored)
        for m in names:
            key = _MEASURES[m][1]
            for q, values in results.items():
                if q in out[m]:
                    out[m][q] = float(values[key])
    return out


def evaluate_scored(
    qrels: Qrels,
    scored: Mapping[str, tuple[Sequence[str], Sequence[float]]],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, float]:
    """Mean metrics when each query's documents (`{qid: (doc ids, scores)}`) are ranked by their scores,
    highest first, ties keeping list order (the sidecar's own stable sort), not trec_eval's id tie-break."""
    return aggregate(evaluate_scored_per_query(qrels, scored, metrics))


def evaluate_scored_per_query(
    qrels: Qrels,
    scored: Mapping[str, tuple[Sequence[str], Sequence[float]]],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, dict[str, float]]:
    """`evaluate_scored` before the mean: {metric: {qid: value}}."""
    run: Run = {}
    for qid, (doc_ids, scores) in scored.items():
        order = sorted(range(len(doc_ids)), key=lambda i: -scores[i])
        run[qid] = order_scores([(doc_ids[i], float(scores[i])) for i in order])[0]
    return evaluate(qrels, run, list(scored), metrics)


def mean(per_query: Mapping[str, float]) -> float:
    return float(np.mean(list(per_query.values()))) if per_query else 0.0


def aggregate(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {m: mean(values) for m, values in per_query.items()}


@dataclass(frozen=True)
class Comparison:
    """How a second system (B, reranked) fares against a first (A, first stage), query by query."""

    metric: str
    wins: int
    losses: int
    ties: int
    mean_a: float
    mean_b: float
    t_statistic: float | None
    t_p_value: float | None
    randomization_p_value: float
    # 95% confidence interval of the mean difference (Student t over the per-query differences).
    ci95: tuple[float, float] | None = None

    @property
    def delta(self) -> float:
        return self.mean_b - self.mean_a


def compare(
    a: Mapping[str, float],
    b: Mapping[str, float],
    metric: str,
    *,
    trials: int = 10_000,
    seed: int = 0,
    tie_epsilon: float = 1e-9,
) -> Comparison:
    qids = sorted(set(a) & set(b))
    xa = np.array([a[q] for q in qids], dtype=np.float64)
    xb = np.array([b[q] for q in qids], dtype=np.float64)
    d = xb - xa
    t, p = paired_t_test(xa, xb)
    return Comparison(
        metric=metric,
        wins=int(np.sum(d > tie_epsilon)),
        losses=int(np.sum(d < -tie_epsilon)),
        ties=int(np.sum(np.abs(d) <= tie_epsilon)),
        mean_a=float(xa.mean()) if len(qids) else 0.0,
        mean_b=float(xb.mean()) if len(qids) else 0.0,
        t_statistic=t,
        t_p_value=p,
        randomization_p_value=randomization_test(xa, xb, trials=trials, seed=seed),
        ci95=mean_difference_ci(d),
    )


def mean_difference_ci(d: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """Confidence interval of the mean of paired differences: mean ± t(level, n−1) · sd / √n (sd with n−1).

    None when undefined (n < 2) or without scipy; a zero-variance sample gives the point (mean, mean)."""
    n = len(d)
    if n < 2:
        return None
    try:
        from scipy import stats
    except ImportError:
        return None
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * float(np.std(d, ddof=1)) / float(np.sqrt(n))
    mean = float(d.mean())
    return mean - half, mean + half


def paired_t_test(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray
) -> tuple[float | None, float | None]:
    """Two-sided paired Student t-test (scipy); (None, None) if undefined (n < 2, no variance) or no scipy."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if len(d) < 2 or float(np.std(d)) == 0.0:
        return None, None
    try:
        from scipy import stats
    except ImportError:
        return None, None
    result = stats.ttest_rel(b, a)
    return float(result.statistic), float(result.pvalue)


# Up to this many queries the randomization test enumerates every sign assignment and is exact.
_EXACT_MAX_N = 16


def randomization_test(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, trials: int = 10_000, seed: int = 0
) -> float:
    """Two-sided paired randomization (sign-flip) test on the mean difference, as IR evaluation uses it.

    Under the null hypothesis the two systems are exchangeable per query, so each difference is equally
    likely to carry either sign; the p-value is the share of sign assignments whose |mean| reaches the
    observed one. Exact for small n; otherwise `trials` seeded random assignments, counted with the observed
    one included so the estimate is never 0.
    """
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = len(d)
    if n == 0:
        return 1.0
    observed = abs(float(d.sum()))
    # A relative tolerance so assignments equal to the observed sum are not lost to rounding.
    threshold = observed - 1e-12 * max(1.0, observed)
    if n <= _EXACT_MAX_N:
        signs = np.array(list(product((1.0, -1.0), repeat=n)))
        sums = np.abs(signs @ d)
        return float(np.mean(sums >= threshold))
    rng = np.random.default_rng(seed)
    hits = 0
    done = 0
    while done < trials:
        batch = min(2_000, trials - done)
        signs = rng.choice(np.array([1.0, -1.0]), size=(batch, n))
        hits += int(np.sum(np.abs(signs @ d) >= threshold))
        done += batch
    return (hits + 1) / (trials + 1)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """count, mean, p50, p95, p99 and max, in milliseconds (linear-interpolated percentiles)."""
    x = np.asarray([s for s in seconds if s is not None], dtype=np.float64) * 1000.0
    if len(x) == 0:
        return {"count": 0}
    p50, p95, p99 = np.percentile(x, [50, 95, 99])
    return {
        "count": len(x),
        "mean_ms": float(x.mean()),
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "max_ms": float(x.max()),
    }
