"""The report's one-line verdict and its confidence interval (hand-computed cases), and the progress lines
printed when the output is not a terminal."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from sidecar.eval import metrics as m
from sidecar.eval import report
from sidecar.progress import LineProgress, progress_display


def test_confidence_interval_matches_hand_computation() -> None:
    d = np.array([0.1, 0.3, 0.2, 0.4])
    # mean 0.25; sd (n-1) = sqrt(0.05/3) = 0.129099; t(0.975, 3) = 3.182446; half = 3.182446 * 0.129099 / 2
    lo, hi = m.mean_difference_ci(d)  # type: ignore[misc]
    assert lo == pytest.approx(0.25 - 0.205425, abs=1e-5) and hi == pytest.approx(0.25 + 0.205425, abs=1e-5)
    assert m.mean_difference_ci(np.array([0.5])) is None
    assert m.mean_difference_ci(np.array([0.2, 0.2, 0.2])) == pytest.approx((0.2, 0.2))


def _summary(
    first: list[float], second: list[float], fused_alone: list[float] | None = None
) -> dict[str, Any]:
    qids = [f"q{i}" for i in range(len(first))]
    a = {"ndcg@10": dict(zip(qids, first, strict=True))}
    b = {"ndcg@10": dict(zip(qids, second, strict=True))}
    summary: dict[str, Any] = {
        "dataset": {"name": "toy", "split": "test", "queries": len(qids)},
        "metrics": {
            "first_stage": {"ndcg@10": float(np.mean(first))},
            "reranked": {"ndcg@10": float(np.mean(second))},
        },
        "comparison": report._comparisons(a, b, ["ndcg@10"], ("first_stage", "reranked"), seed=0),
    }
    if fused_alone is not None:
        summary["fusion"] = {"applied_name": "blend(alpha=0.7, minmax)"}
        summary["metrics"]["reranked_no_fusion"] = {"ndcg@10": float(np.mean(fused_alone))}
    return summary


def test_verdict_calls_a_clear_gain_significant() -> None:
    first = [0.2, 0.4, 0.5, 0.3, 0.6, 0.1, 0.5, 0.4]
    second = [x + 0.1 + 0.01 * i for i, x in enumerate(first)]  # every query better, mean +0.135
    line = report.verdict(_summary(first, second, fused_alone=first))
    assert line.startswith("Verdict: reranking fused with the first stage (blend(alpha=0.7, minmax))")
    assert "from 0.3750 to 0.5100 (+0.1350, 95% CI" in line
    assert "8 queries better, 0 worse): a significant gain over 8 toy test queries" in line
    assert line.endswith("The model alone, without fusion: 0.3750 (+0.0000).")


def test_verdict_says_no_significant_change_and_loss() -> None:
    first = [0.5, 0.4, 0.6, 0.3]
    mixed = [0.6, 0.3, 0.6, 0.35]  # +0.1, -0.1, 0, +0.05: p far above 0.05
    assert "): no significant change over 4" in report.verdict(_summary(first, mixed))
    worse = [x - 0.2 - 0.01 * i for i, x in enumerate(first)]
    assert "): a significant loss over 4" in report.verdict(_summary(first, worse))


def test_first_stage_only_verdict() -> None:
    summary = {"dataset": {"queries": 3}, "metrics": {"first_stage": {"ndcg@10": 0.5}}}
    assert (
        report.verdict(summary)
        == "Verdict: first stage only (3 queries): ndcg@10 0.5000; nothing was reranked."
    )


def test_truncation_count_has_a_denominator() -> None:
    assert report._share(24513, 30000) == "24513 of 30000 reranked hits (81.7%)"


def test_progress_prints_lines_when_not_on_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    progress = progress_display(console)
    assert isinstance(progress, LineProgress)
    progress.min_interval = 0.0
    with progress:
        task = progress.add_task("replaying 20 queries", total=20)
        for _ in range(20):
            progress.advance(task)
    lines = out.getvalue().splitlines()
    assert lines[0] == "replaying 20 queries (20) ..."
    assert lines[1].startswith("replaying 20 queries: 2/20 (10%),")
    assert lines[-1].startswith("replaying 20 queries: done, 20 in ")
    assert len(lines) == 11  # start, nine tenths, done
    # On a terminal it stays rich's live bar.
    assert not isinstance(progress_display(Console(file=io.StringIO(), force_terminal=True)), LineProgress)
