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

from sidecar.guard import ALL_CONFIGS, REFERENCE, run_guard, summary_lines
from tests.conftest import SCIFACT
from tests.guard_checks import check_record

SLICE = {"split": "test", "queries": 10, "depth": 20}


@pytest.fixture(scope="module")
def packaged_guard(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    if not (SCIFACT / "qrels" / "test.tsv").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    configs = [c for c in ALL_CONFIGS if c.runtime == "torch" or c.key == "onnxruntime/int8"]
    scores: dict[str, Any] = {}
    record = run_guard(
        None,
        SCIFACT,
        configs=configs,
        scores_out=scores,
        settings_extra={"export_cache_dir": tmp_path_factory.mktemp("exports")},
        **SLICE,  # type: ignore[arg-type]
    )
    return record, scores


def test_figures_match_an_independent_computation(packaged_guard: tuple[dict, dict]) -> None:
    record, scores = packaged_guard
    print("\n".join(summary_lines(record)))
    keys = [f"{r['runtime']}/{r['precision']}" for r in record["configs"]]
    assert keys == ["torch/float32", "torch/bfloat16", "torch/int8-dynamic", "onnxruntime/int8"]
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
    from sidecar.scoring.auto_runtime import BOUND_THRESHOLD, PACKAGED_RECORD, THRESHOLD, record_problem
    from sidecar.scoring.loading import resolve_source

    path = PACKAGED_RECORD
    record = json.loads(path.read_text())
    assert record_problem(record, resolve_source(None, None).revision) is None
    assert record["dataset"]["split"] == "train" and record["dataset"]["name"] == "scifact"
    assert record["dataset"]["depth"] == 100 and record["dataset"]["queries"] >= 50
    first = record["configs"][0]
    assert (first["runtime"], first["precision"], first["delta"]) == ("torch", "float32", 0.0)
    for r in record["configs"]:
        assert abs(r["ndcg@10"] - record["baseline"]["ndcg@10"] - r["delta"]) < 1e-5
        assert r["passed"] == (r["delta"] >= -THRESHOLD and r["delta_lower"] >= -BOUND_THRESHOLD)


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


def test_the_guard_fails_degraded_int8_and_auto_never_picks_it(packaged_guard: tuple[dict, dict]) -> None:
    """On this slice both int8 configurations really degrade the packaged model: cosines move by up to 0.10,
    no query keeps its top-10 order, and nDCG@10 drops by more than 0.005 (measured on the AVX512-BF16 EPYC:
    torch dynamic int8 -0.0069, ONNX Runtime int8 -0.0106). The guard fails them, and `auto` never picks a
    failed configuration, even when it is by far the fastest."""
    from sidecar.scoring.auto_runtime import Offer, choose

    record, _ = packaged_guard
    rows = {f"{r['runtime']}/{r['precision']}": r for r in record["configs"]}
    failed = {k for k, r in rows.items() if not r["passed"]}
    assert failed and failed <= {"torch/int8-dynamic", "onnxruntime/int8"}, rows
    for key in failed:
        assert rows[key]["delta"] < -0.005 and rows[key]["max_abs_diff"] > 0.05
        assert rows[key]["top10_order_kept"] < 0.5
    fastest_failed = {
        **record,
        "configs": [
            {**r, "pairs_per_s": r["pairs_per_s"] * (1000 if not r["passed"] else 1)}
            for r in record["configs"]
        ],
    }
    choice = choose(fastest_failed, Offer(native_bf16=True, runtimes=frozenset({"torch", "onnxruntime"})))
    assert choice.guarded and f"{choice.runtime}/{choice.precision}" not in failed
    assert rows[f"{choice.runtime}/{choice.precision}"]["passed"]
