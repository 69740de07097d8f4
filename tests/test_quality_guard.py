"""The quality guard end to end on a small real slice: the packaged all-MiniLM-L6-v2 (a trained bi-encoder)
on 10 SciFact test queries x BM25 top-20, in torch float32, bfloat16 and dynamic int8.

Every recorded figure is recomputed from the scores with pytrec_eval (tests/guard_checks.py); the reference
scores themselves are checked against sentence-transformers; the packaged model's shipped record is checked
for what `auto` may rely on. (The cross-encoder and the guard failing a configuration:
tests/training/test_guard_finetuned.py.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sidecar.guard import ALL_CONFIGS, REFERENCE, run_guard
from tests.conftest import SCIFACT
from tests.guard_checks import check_record

SLICE = {"split": "test", "queries": 10, "depth": 20}


@pytest.fixture(scope="module")
def packaged_guard() -> tuple[dict[str, Any], dict[str, Any]]:
    if not (SCIFACT / "qrels" / "test.tsv").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    configs = [c for c in ALL_CONFIGS if c.runtime == "torch"]
    scores: dict[str, Any] = {}
    record = run_guard(None, SCIFACT, configs=configs, scores_out=scores, **SLICE)  # type: ignore[arg-type]
    return record, scores


def test_figures_match_an_independent_computation(packaged_guard: tuple[dict, dict]) -> None:
    record, scores = packaged_guard
    assert [r["precision"] for r in record["configs"]] == ["float32", "bfloat16", "int8-dynamic"]
    assert record["dataset"]["pairs"] == 200 and record["dataset"]["queries"] == 10
    assert record["model"]["backend"] == "bi-encoder"
    check_record(record, scores)
    # The precisions really differ (else the comparison measured nothing).
    rows = {r["precision"]: r for r in record["configs"]}
    assert rows["float32"]["max_abs_diff"] == 0.0
    assert rows["bfloat16"]["max_abs_diff"] > 0 and rows["int8-dynamic"]["max_abs_diff"] > 0
    assert rows["bfloat16"]["reported_dtype"] == "bfloat16"
    assert rows["int8-dynamic"]["reported_dtype"] == "int8-dynamic"


def test_reference_scores_are_sentence_transformers_cosines(packaged_guard: tuple[dict, dict]) -> None:
    from sentence_transformers import SentenceTransformer

    from sidecar.model_factory import packaged_embedding_model_dir

    _, scores = packaged_guard
    cands = scores["candidates"]
    model = SentenceTransformer(str(packaged_embedding_model_dir()), device="cpu")
    for q in cands.qids[:3]:
        query, docs = cands.pairs[q][0][0], [d for _, d in cands.pairs[q]]
        qv = model.encode([query], normalize_embeddings=True)
        dv = model.encode(docs, normalize_embeddings=True)
        np.testing.assert_allclose(scores[REFERENCE.key][q], (dv @ qv.T).ravel(), atol=1e-4)


def test_packaged_record_is_measured_on_train_and_fits_the_packaged_weights() -> None:
    """The record `auto` uses for the default model: the packaged weights, SciFact train (never test), every
    verdict consistent with its own figures, and the reference first."""
    from sidecar.model_factory import packaged_embedding_model_dir
    from sidecar.scoring.auto_runtime import THRESHOLD, record_problem
    from sidecar.scoring.loading import resolve_source

    path = packaged_embedding_model_dir() / "guard.json"
    record = json.loads(path.read_text())
    assert record_problem(record, resolve_source(None, None).revision) is None
    assert record["dataset"]["split"] == "train" and record["dataset"]["name"] == "scifact"
    assert record["dataset"]["depth"] == 100 and record["dataset"]["queries"] >= 50
    first = record["configs"][0]
    assert (first["runtime"], first["precision"], first["delta"]) == ("torch", "float32", 0.0)
    for r in record["configs"]:
        assert abs(r["ndcg@10"] - record["baseline"]["ndcg@10"] - r["delta"]) < 1e-5
        assert r["passed"] == (r["delta"] >= -THRESHOLD)


def test_guard_cli_refuses_a_test_split_without_out(capsys: pytest.CaptureFixture[str]) -> None:
    from sidecar.cli import main

    code = main(["guard", "--dataset-dir", str(SCIFACT), "--split", "test", "--queries", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "test-split record is a report" in err and "Traceback" not in err
    code = main(["guard", "--dataset-dir", str(SCIFACT), "--configs", "torch/float64", "--out", "x.json"])
    assert code == 2 and "unknown configuration 'torch/float64'" in capsys.readouterr().err


def test_guard_cli_writes_a_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sidecar.cli import main

    if not (SCIFACT / "qrels" / "test.tsv").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    out = tmp_path / "r.json"
    code = main(
        ["guard", "--dataset-dir", str(SCIFACT), "--split", "test", "--queries", "2", "--depth", "10",
         "--configs", "torch/float32", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    assert record["dataset"]["pairs"] == 20 and len(record["configs"]) == 1
    assert "torch/float32" in capsys.readouterr().out
