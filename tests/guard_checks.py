"""Independent checks of a guard record against the scores it was computed from (shared by the guard tests).

Nothing here calls the guard's own metric code: each query's ranking is built here (scores descending, ties
in BM25 order, as the sidecar sorts), handed to pytrec_eval with strictly decreasing stand-in scores, and the
agreement figures are recomputed with numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytrec_eval


def independent_ndcg10(cands: Any, scores: dict[str, np.ndarray]) -> float:
    return float(np.mean(independent_per_query(cands, scores)))


def independent_per_query(cands: Any, scores: dict[str, np.ndarray]) -> np.ndarray:
    run = {}
    for q in cands.qids:
        s = [float(x) for x in scores[q]]
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        run[q] = {cands.doc_ids[q][i]: float(len(order) - rank) for rank, i in enumerate(order)}
    qrels = {q: {d: int(r) for d, r in cands.qrels[q].items()} for q in cands.qids}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    return np.array([per_query[q]["ndcg_cut_10"] if q in per_query else 0.0 for q in cands.qids])


def check_record(record: dict[str, Any], scores_out: dict[str, Any]) -> None:
    """Every figure of every row recomputed from the scores; the verdict from the recomputed change."""
    cands = scores_out["candidates"]
    ref = scores_out["torch/float32"]
    ref_per_query = independent_per_query(cands, ref)
    ref_ndcg = float(np.mean(ref_per_query))
    assert abs(record["baseline"]["ndcg@10"] - ref_ndcg) < 1e-6
    for row in record["configs"]:
        got = scores_out[f"{row['runtime']}/{row['precision']}"]
        first = row.get("cascade")
        if first:  # the first pass's scores with its top `depth` (ties in BM25 order) re-scored
            fast = scores_out[f"{first['runtime']}/{first['precision']}"]
            merged = {}
            for q in cands.qids:
                top = sorted(range(len(fast[q])), key=lambda i: (-float(fast[q][i]), i))[: first["depth"]]
                merged[q] = fast[q].copy()
                merged[q][top] = got[q][top]
            got = merged
        per_query = independent_per_query(cands, got)
        ndcg = float(np.mean(per_query))
        assert abs(row["ndcg@10"] - ndcg) < 1e-6, row
        assert abs(row["delta"] - (ndcg - ref_ndcg)) < 1e-6, row
        change = per_query - ref_per_query
        se = float(np.std(change, ddof=1) / np.sqrt(len(change))) if len(change) > 1 else 0.0
        lower = ndcg - ref_ndcg - 1.2816 * se  # one-sided 90%
        assert abs(row["delta_se"] - se) < 1e-6 and abs(row["delta_lower"] - lower) < 1e-6, row
        diff = max(float(np.max(np.abs(got[q] - ref[q]))) for q in cands.qids)
        assert abs(row["max_abs_diff"] - diff) < 1e-6, row
        kept = np.mean(
            [
                list(np.argsort(-got[q], kind="stable")[:10]) == list(np.argsort(-ref[q], kind="stable")[:10])
                for q in cands.qids
            ]
        )
        assert abs(row["top10_order_kept"] - kept) < 1e-4, row
        assert row["passed"] == (ndcg - ref_ndcg >= -0.005 - 1e-6 and lower >= -0.010 - 1e-6), row
        assert row["pairs_per_s"] > 0
