"""The quality guard on a cross-encoder fine-tuned by the project's own `finetune` (a tiny BERT trained on a
SciFact train slice), judged on 10 SciFact test queries x BM25 top-20 — and the guard failing a
configuration whose scores are really degraded, which `auto` then never picks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import main
from sidecar.guard import ALL_CONFIGS, run_guard
from sidecar.model_factory import build_bert_cross_encoder
from tests.conftest import SCIFACT
from tests.guard_checks import check_record


@pytest.fixture(scope="module")
def finetuned_ce(
    scifact_train_slice: Path, training_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    base = build_bert_cross_encoder(tmp_path_factory.mktemp("guard-base") / "tiny", max_length=128, seed=5)
    out = tmp_path_factory.mktemp("guard-finetuned") / "model"
    code = main(
        ["finetune", "--data", str(scifact_train_slice), "--base", str(base), "--out", str(out),
         "--epochs", "4", "--batch-size", "8", "--learning-rate", "1e-3", "--max-length", "96",
         "--dev-fraction", "0.25", "--dev-depth", "10", "--mine-depth", "20", "--skip-top", "2",
         "--hard-negatives", "2", "--random-negatives", "1", "--no-tune-fusion",
         "--precision", "float32", "--cache-dir", str(training_cache)]
    )  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def ce_guard(finetuned_ce: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not (SCIFACT / "qrels" / "test.tsv").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    scores: dict[str, Any] = {}
    configs = [c for c in ALL_CONFIGS if c.runtime == "torch"]
    record = run_guard(
        str(finetuned_ce), SCIFACT, split="test", queries=10, depth=20, configs=configs, scores_out=scores
    )
    return record, scores


def test_finetuned_cross_encoder_figures_match_an_independent_computation(
    ce_guard: tuple[dict, dict],
) -> None:
    record, scores = ce_guard
    print(record)
    assert record["model"]["backend"] == "cross-encoder"
    check_record(record, scores)
