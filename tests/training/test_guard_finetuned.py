"""The quality guard on a cross-encoder fine-tuned by the project's own `finetune` (a tiny BERT trained on a
SciFact train slice), judged on 10 SciFact test queries x BM25 top-20 — and the guard failing a
configuration whose scores are really degraded, which `auto` then never picks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.guard import ALL_CONFIGS, run_guard
from tests.conftest import SCIFACT
from tests.guard_checks import check_record


@pytest.fixture(scope="module")
def ce_guard(finetuned: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not (SCIFACT / "qrels" / "test.tsv").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    scores: dict[str, Any] = {}
    configs = [c for c in ALL_CONFIGS if c.runtime == "torch"]
    record = run_guard(
        str(finetuned), SCIFACT, split="test", queries=10, depth=20, configs=configs, scores_out=scores
    )
    return record, scores


def test_finetuned_cross_encoder_figures_match_an_independent_computation(
    ce_guard: tuple[dict, dict],
) -> None:
    record, scores = ce_guard
    print(record)
    assert record["model"]["backend"] == "cross-encoder"
    check_record(record, scores)
