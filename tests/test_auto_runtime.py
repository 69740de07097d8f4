"""What `auto` picks from a quality-guard record: hand-written records, a fixed offer, then a real load.

The records are written here, not produced by the guard, so the choice is tested against figures chosen
to separate the rules: the fastest passed configuration wins; a failed one is never picked however fast;
one this machine cannot run is skipped; without a record (or with one that does not fit) it is float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.scoring import auto_runtime, device
from sidecar.scoring.auto_runtime import Offer, choose, record_path
from tests.conftest import make_scorer

ALL = Offer(native_bf16=True, runtimes=frozenset({"torch", "openvino", "onnxruntime"}))


def row(
    runtime: str, dtype: str, quantize: str, delta: float, pps: float, passed: bool | None = None
) -> dict:
    return {
        "runtime": runtime,
        "dtype": dtype,
        "quantize": quantize,
        "precision": {"none": dtype}.get(quantize, "int8"),
        "ndcg@10": 0.6 + delta,
        "delta": delta,
        "max_abs_diff": 0.01,
        "top10_order_kept": 0.9,
        "pairs_per_s": pps,
        "passed": delta >= -0.005 if passed is None else passed,
    }


def record(*rows: dict, revision: str = "sha256:abc", split: str = "train") -> dict:
    return {
        "format": "rerank-sidecar-guard/1",
        "model": {"id": "m", "revision": revision, "backend": "cross-encoder"},
        "dataset": {"name": "scifact", "split": split, "queries": 50, "depth": 100},
        "threshold": 0.005,
        "configs": [row("torch", "float32", "none", 0.0, 10.0), *rows],
    }


def test_the_fastest_passed_configuration_wins() -> None:
    rec = record(
        row("torch", "bfloat16", "none", -0.001, 18.0),
        row("openvino", "bfloat16", "int8", -0.004, 39.0),
        row("openvino", "float32", "int8", -0.002, 33.0),
    )
    got = choose(rec, ALL)
    assert (got.runtime, got.dtype, got.quantize, got.precision) == (
        "openvino",
        "bfloat16",
        "int8",
        "int8+bfloat16",
    )
    assert got.guarded and "nDCG@10 -0.0040 against torch float32 on scifact train" in got.reason


def test_a_failed_configuration_is_never_picked_even_when_fastest() -> None:
    rec = record(
        row("torch", "float32", "int8", -0.012, 27.0),  # fastest, lost 0.012
        row("torch", "bfloat16", "none", 0.002, 18.0),
    )
    assert choose(rec, ALL).precision == "bfloat16"
    # A record whose 'passed' flag was edited by hand does not widen the threshold: delta decides too.
    rec = record(row("onnxruntime", "float32", "int8", -0.0051, 50.0, passed=True))
    assert choose(rec, ALL).precision == "float32" and choose(rec, ALL).runtime == "torch"
    # Failing only just (-0.0050 passes, -0.0051 does not).
    rec = record(row("onnxruntime", "float32", "int8", -0.005, 50.0))
    assert choose(rec, ALL).runtime == "onnxruntime"


def test_what_this_machine_cannot_run_is_skipped() -> None:
    rec = record(
        row("openvino", "bfloat16", "none", 0.0, 30.0),
        row("torch", "bfloat16", "none", 0.0, 20.0),
        row("onnxruntime", "float32", "int8", -0.001, 15.0),
    )
    torch_only = Offer(native_bf16=True, runtimes=frozenset({"torch"}))
    got = choose(rec, torch_only)
    assert (got.runtime, got.precision) == ("torch", "bfloat16")
    # No native bf16: bf16 anywhere is skipped (emulated, slower than float32).
    got = choose(rec, Offer(native_bf16=False, runtimes=ALL.runtimes))
    assert (got.runtime, got.precision) == ("onnxruntime", "int8")
    got = choose(rec, Offer(native_bf16=False, runtimes=frozenset({"torch"})))
    assert (got.runtime, got.precision) == ("torch", "float32") and got.guarded


def test_no_record_means_float32() -> None:
    got = choose(None, ALL)
    assert (got.runtime, got.dtype, got.quantize) == ("torch", "float32", "none")
    assert not got.guarded and "cannot lose quality" in got.reason
    # A runtime shown to match torch in float32 may serve the fallback.
    assert choose(None, ALL, fp32_runtime="openvino").runtime == "openvino"
    # An explicit --quantize int8 is honoured without a record (the documented command works whatever
    # auto would pick; the rest is the runtime's own auto) and says it is not guarded.
    got = choose(None, ALL, quantize="int8")
    assert (got.dtype, got.quantize, got.precision) == ("auto", "int8", "int8-dynamic")
    assert "not guarded" in got.reason


def test_explicit_runtime_and_quantize_narrow_the_choice() -> None:
    rec = record(
        row("openvino", "bfloat16", "int8", -0.001, 39.0),
        row("torch", "bfloat16", "none", -0.001, 18.0),
        row("torch", "float32", "int8", -0.002, 25.0),
    )
    assert choose(rec, ALL, runtime="torch").precision == "int8-dynamic"
    assert choose(rec, ALL, runtime="onnxruntime").runtime == "onnxruntime"  # nothing measured: fp32 there
    assert choose(rec, ALL, runtime="onnxruntime").precision == "float32"
    assert choose(rec, ALL, quantize="int8").precision == "int8+bfloat16"


def test_records_that_do_not_fit_are_refused() -> None:
    assert auto_runtime.record_problem(record(), "sha256:abc") is None
    assert "other weights" in (auto_runtime.record_problem(record(), "sha256:def") or "")
    assert "test split" in (auto_runtime.record_problem(record(split="test"), "sha256:abc") or "")
    assert "format" in (auto_runtime.record_problem({"format": "x"}, None) or "")


# ---- through loading: the record found on disk decides what `--dtype auto` loads -------------------------


@pytest.fixture
def export_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RERANK_EXPORT_CACHE_DIR", str(tmp_path / "exports"))
    return tmp_path / "exports"


@pytest.mark.parametrize("native", [True, False])
def test_auto_without_a_record_loads_float32_and_says_how_to_guard(
    native: bool, bert_ce_dir: Path, export_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level("INFO", logger="sidecar.scoring.loading"):
        scorer = make_scorer(bert_ce_dir, dtype="auto", device="cpu")
    assert scorer.info.dtype == "float32"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision:")]
    assert len(lines) == 1 and "cannot lose quality" in lines[0] and "rerank-sidecar guard" in lines[0]


def test_auto_follows_a_record_in_the_export_cache(
    bert_ce_dir: Path, export_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    from sidecar.scoring.loading import resolve_source

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    revision = resolve_source(str(bert_ce_dir), None).revision
    rec = record(
        row("torch", "bfloat16", "none", -0.02, 30.0),  # failed
        row("torch", "float32", "int8", -0.001, 20.0),
        revision=revision,
    )
    path = record_path(export_cache, revision)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    with caplog.at_level("INFO", logger="sidecar.scoring.loading"):
        scorer = make_scorer(bert_ce_dir, dtype="auto", device="cpu")
    assert scorer.info.dtype == "int8-dynamic"
    assert any(str(path) in r.getMessage() for r in caplog.records)
    # An explicit precision is never second-guessed by a record.
    assert make_scorer(bert_ce_dir, dtype="bfloat16", device="cpu").info.dtype == "bfloat16"
    # A record for other weights is not used.
    path.write_text(json.dumps({**rec, "model": {**rec["model"], "revision": "sha256:000000000000"}}))
    assert make_scorer(bert_ce_dir, dtype="auto", device="cpu").info.dtype == "float32"


def test_a_guard_record_in_the_model_directory_does_not_change_its_hash(
    bert_ce_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from sidecar.scoring.loading import resolve_source

    copy = tmp_path / "model"
    shutil.copytree(bert_ce_dir, copy)
    before = resolve_source(str(copy), None).revision
    (copy / "guard.json").write_text(json.dumps(record(revision=before)))
    assert resolve_source(str(copy), None).revision == before
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ', "x": 1}', 1))
    assert resolve_source(str(copy), None).revision != before


# ---- cascades: a first pass the guard failed, then the top re-scored by one it passed --------------------


def cascade_row(
    first: str, depth: int, delta: float, pps: float, served=("openvino", "bfloat16", "none")
) -> dict:  # type: ignore[no-untyped-def]
    from sidecar.scoring.runtimes import CONFIGS

    runtime, dtype, quantize = CONFIGS[first]
    r = row(*served, delta, pps)
    r["cascade"] = {
        "runtime": runtime,
        "dtype": dtype,
        "quantize": quantize,
        "precision": first.split("/")[1],
        "depth": depth,
    }
    r["pairs_per_s_estimated"] = True
    return r


CASCADE_RECORD = record(
    row("openvino", "bfloat16", "none", 0.0, 29.0),
    row("openvino", "bfloat16", "int8", -0.03, 38.0),  # failed alone
    cascade_row("openvino/int8+bfloat16", 10, -0.001, 33.0),
    cascade_row("openvino/int8+bfloat16", 20, 0.0, 31.0),
    cascade_row("openvino/int8", 10, -0.02, 36.0),  # a cascade that failed
)


def test_a_passed_cascade_is_picked_when_fastest() -> None:
    got = choose(CASCADE_RECORD, ALL)
    assert (got.runtime, got.precision, got.cascade, got.cascade_depth) == (
        "openvino",
        "bfloat16",
        "openvino/int8+bfloat16",
        10,
    )
    assert got.guarded and "a cascade" in got.reason


def test_cascades_compete_only_when_left_to_auto() -> None:
    for kwargs in ({"cascade": "none"}, {"cascade": "openvino/int8"}, {"quantize": "int8"}):
        got = choose(CASCADE_RECORD, ALL, **kwargs)
        assert got.cascade == "none", kwargs
    assert choose(CASCADE_RECORD, ALL, cascade="none").precision == "bfloat16"
    # A first pass this machine cannot run is skipped like any configuration.
    no_bf16_first = Offer(native_bf16=True, runtimes=frozenset({"torch", "openvino"}))
    assert choose(CASCADE_RECORD, no_bf16_first).cascade == "openvino/int8+bfloat16"
    no_openvino = Offer(native_bf16=True, runtimes=frozenset({"torch", "onnxruntime"}))
    assert choose(CASCADE_RECORD, no_openvino).cascade == "none"


def test_auto_loads_a_cascade_from_the_record(
    bert_ce_dir: Path, export_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecar.scoring.loading import resolve_source

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)  # float32 passes: any CPU runs them
    revision = resolve_source(str(bert_ce_dir), None).revision
    rec = record(
        row("openvino", "float32", "int8", -0.03, 38.0),
        cascade_row("openvino/int8", 10, 0.0, 33.0, served=("torch", "float32", "none")),
        revision=revision,
    )
    path = record_path(export_cache, revision)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    info = make_scorer(bert_ce_dir, dtype="auto", device="cpu").info
    assert (info.runtime, info.dtype, info.cascade, info.cascade_depth) == (
        "torch",
        "float32",
        "openvino/int8",
        10,
    )
    # An explicit depth wins over the record's; --cascade none, or an explicit --dtype, turns it off.
    assert make_scorer(bert_ce_dir, dtype="auto", device="cpu", cascade_depth=5).info.cascade_depth == 5
    assert make_scorer(bert_ce_dir, dtype="auto", device="cpu", cascade="none").info.cascade == ""
    assert make_scorer(bert_ce_dir, dtype="float32", device="cpu").info.cascade == ""


def test_a_mean_change_that_passes_only_by_chance_is_refused() -> None:
    """The guard also holds the change's lower confidence bound against -0.010; a record whose bound is
    below it is refused even when its mean change and a hand-edited 'passed' say otherwise."""
    noisy = row("openvino", "bfloat16", "int8", 0.001, 50.0, passed=True)
    noisy["delta_lower"] = -0.012
    steady = row("openvino", "bfloat16", "none", 0.0, 30.0)
    steady["delta_lower"] = -0.008
    got = choose(record(noisy, steady), ALL)
    assert (got.runtime, got.precision) == ("openvino", "bfloat16")
