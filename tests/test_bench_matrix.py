"""`rerank-sidecar bench --matrix` end to end on a tiny model and a tiny BEIR collection: real `serve`
processes, the real sentence-transformers baseline, and a report whose every ratio is checked against
the numbers it was computed from (and the FLOP count against the model's own configuration)."""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from sidecar import bench
from sidecar.progress import progress_display
from tests.eval.beir_helpers import write_beir

MAX_LENGTH = 64
# Every document and query shares "cells", so BM25 returns the whole corpus for each query.
CORPUS: list[dict[str, object]] = [
    {"_id": f"d{i}", "title": title, "text": f"{text} cells"}
    for i, (title, text) in enumerate(
        [
            ("Stem cells", "Stem cells renew themselves and differentiate into many tissue types."),
            ("", "T cells recognise antigens presented on the surface of infected cells."),
            ("Neurons", "Neurons are excitable cells that transmit signals along their axons."),
            ("Red blood", "Red blood cells carry oxygen bound to haemoglobin through the body."),
            ("Plants", "Plant cells have walls made of cellulose and contain chloroplasts."),
            ("Cancer", "Tumour cells divide without the checks that stop healthy tissue from growing."),
        ]
    )
]
QUERIES: list[dict[str, object]] = [
    {"_id": "q1", "text": "which cells carry oxygen"},
    {"_id": "q2", "text": "how do immune cells find infected cells"},
    {"_id": "q3", "text": "cells in plants"},
]
QRELS = [("q1", "d3", 1), ("q2", "d1", 1), ("q3", "d4", 1)]


def _run(tmp_path: Path, model_dir: Path, *extra: str) -> tuple[int, dict, str]:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out, md = tmp_path / "report.json", tmp_path / "report.md"
    args = parser.parse_args(
        [
            "--dataset-dir",
            str(write_beir(tmp_path / "beir", CORPUS, QUERIES, QRELS)),
            "--model",
            str(model_dir),
            "--queries",
            "2",
            "--depth",
            str(len(CORPUS)),
            "--concurrency",
            "2",
            "--lone-repeats",
            "2",
            "--skip-global-baseline",
            "--out",
            str(out),
            "--markdown",
            str(md),
            *extra,
        ]
    )
    rc = bench.main(args)
    return rc, json.loads(out.read_text()), md.read_text()


def _expected_flops(model_dir: Path, requests: list[dict]) -> float:
    """From the config and the tokenizer, independently of the bench: BERT layers hold Q, K, V, O
    (hidden^2 each) and the MLP's two (hidden x intermediate) weights."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    weights = layers * (4 * h * h + 2 * h * cfg.intermediate_size)
    docs = {str(d["_id"]): d for d in CORPUS}
    total = 0.0
    for request in requests:
        for doc_id in request["doc_ids"]:
            d = docs[doc_id]
            text = f"{d['title']} {d['text']}" if d["title"] else str(d["text"])
            n = min(len(tok(request["query"], text)["input_ids"]), MAX_LENGTH)
            total += 2 * weights * n + 4 * n * n * h * layers
    return total


def _serve_children() -> list[int]:
    """This process's `serve` children still alive (Linux /proc)."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"sidecar serve" in cmd:
            out.append(int(proc.name))
    return out


def test_matrix_report_is_computed_from_its_own_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sidecar.model_factory import build_bert_cross_encoder

    model_dir = build_bert_cross_encoder(tmp_path / "ce", max_length=MAX_LENGTH)
    monkeypatch.setenv("RERANK_CACHE_DIR", str(tmp_path / "cache"))  # the BM25 index of the tiny corpus
    # An install whose onnxruntime cannot be imported: that runtime must be skipped, with the reason.
    # (pyserini imports it too, so pyserini is loaded first, on the JVM the evaluator configures.)
    from sidecar.eval import java_env

    java_env.configure()
    import pyserini.search.lucene  # noqa: F401

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    rc, report, md = _run(tmp_path, model_dir, "--matrix", "torch:float32,torch:int8,onnxruntime:float32")
    assert rc == 0
    printed = capsys.readouterr().out
    if Path("/proc/self/stat").exists():
        assert _serve_children() == []  # every configuration's sidecar was stopped

    hw = report["hardware"]
    assert hw["cpu_model"] and hw["torch_threads"] >= 1
    assert set(hw["flags"]) == set(bench.CPU_FLAGS)
    assert hw["versions"]["torch"]
    ceil = report["ceilings"]
    assert ceil["float32"]["gflops"] > 0 and ceil["bfloat16"]["gflops"] > 0
    assert ceil["bfloat16"]["native"] == hw["native_bf16"]
    assert ceil["threads"] == hw["sidecar_threads"] >= 1

    wl = report["workload"]
    assert [r["query"] for r in wl["requests"]] == [QUERIES[0]["text"], QUERIES[1]["text"]]
    assert [sorted(r["doc_ids"]) for r in wl["requests"]] == [[d["_id"] for d in CORPUS]] * 2
    assert wl["pairs"] == 2 * len(CORPUS)
    assert wl["max_length"] == MAX_LENGTH
    assert wl["flops_total"] == pytest.approx(_expected_flops(model_dir, wl["requests"]), rel=1e-9)
    assert wl["flops_first_request"] == pytest.approx(
        _expected_flops(model_dir, wl["requests"][:1]), rel=1e-9
    )

    base = report["baseline"]
    assert base["pairs_per_s"] == pytest.approx(wl["pairs"] / base["wall_s"])
    assert base["gflops"] == pytest.approx(wl["flops_total"] / base["wall_s"] / 1e9)

    by_label = {r["label"]: r for r in report["configs"]}
    assert list(by_label) == ["torch:float32", "torch:int8", "onnxruntime:float32"]
    skipped = by_label["onnxruntime:float32"]
    assert skipped["status"] == "skipped" and "onnxruntime" in skipped["reason"]
    assert "onnxruntime:float32: skipped" in printed

    for label in ("torch:float32", "torch:int8"):
        r = by_label[label]
        assert r["status"] == "ok", r
        assert r["pairs_per_s"] == pytest.approx(wl["pairs"] / r["wall_s"])
        assert r["ratio"] == pytest.approx(r["pairs_per_s"] / base["pairs_per_s"])
        assert r["gflops"] == pytest.approx(wl["flops_total"] / r["wall_s"] / 1e9)
        assert r["ceiling"] == "float32"
        assert r["ceiling_share"] == pytest.approx(r["gflops"] / ceil["float32"]["gflops"])
        lone = r["lone"]
        assert len(lone["latencies_s"]) == len(lone["pure_compute_s"]) == 2
        assert lone["ratio"] == pytest.approx(
            statistics.median(lone["latencies_s"]) / statistics.median(lone["pure_compute_s"])
        )
        assert lone["pure_compute_gflops"] == pytest.approx(
            wl["flops_first_request"] / lone["pure_compute_p50_s"] / 1e9
        )
        assert r["ranking"]["queries"] == 2
        assert f"sidecar {label}" in md and f"sidecar {label}" in printed
    fp32, int8 = by_label["torch:float32"], by_label["torch:int8"]
    assert fp32["info"]["dtype"] == "float32" and int8["info"]["dtype"].startswith("int8")
    assert int8["serve_flags"][-4:] == ["--quantize", "int8", "--dtype", "float32"]
    # The same fp32 model as the baseline: the scores line up document by document.
    assert fp32["ranking"]["max_abs_score_diff"] < 1e-4
    assert fp32["ranking"]["top10_identical"] == 2
    assert int8["ranking"]["max_abs_score_diff"] > 0  # dynamic int8 really ran
    assert "onnxruntime:float32: skipped" in md
    # the goal lines name exactly the configurations whose own figures meet them
    fast = [lb for lb in ("torch:float32", "torch:int8") if by_label[lb]["ratio"] >= bench.GOAL_RATIO]
    goal = next(ln for ln in md.splitlines() if "x the baseline at concurrency" in ln)
    assert all((lb in goal) == (lb in fast) for lb in ("torch:float32", "torch:int8"))
    assert report["table"]["columns"] == list(bench.COLUMNS) and len(report["table"]["rows"]) == 3
    assert [row[3] for row in report["table"]["rows"][1:]] == [
        f"{by_label[lb]['ratio']:.2f}" for lb in ("torch:float32", "torch:int8")
    ]
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 2 + 1 + 2  # header, rule, the baseline, the two configurations run
    assert {ln.replace("\\|", "").count("|") for ln in table} == {len(bench.COLUMNS) + 1}


def test_matrix_spec_errors_and_defaults() -> None:
    every = bench.parse_matrix("all")
    assert len(every) == len(bench.RUNTIMES) * len(bench.PRECISIONS)
    assert bench.parse_matrix("openvino:int8+bfloat16, auto:auto") == [
        bench.Config("openvino", "int8+bfloat16"),
        bench.Config("auto", None),
    ]
    with pytest.raises(ValueError, match="RUNTIME:PRECISION"):
        bench.parse_matrix("torch-float32")
    with pytest.raises(ValueError, match="'tensorrt:float32'"):
        bench.parse_matrix("tensorrt:float32")
    cascade = bench.parse_matrix("openvino:bfloat16>openvino/int8+bfloat16@10")
    assert cascade == [bench.Config("openvino", "bfloat16", "openvino/int8+bfloat16", 10)]
    assert cascade[0].serve_flags()[-4:] == ["--cascade", "openvino/int8+bfloat16", "--cascade-depth", "10"]
    assert cascade[0].label == "openvino:bfloat16 after openvino/int8+bfloat16@10"
    for bad in (
        "openvino:bfloat16>torch/float32@10",
        "openvino:bfloat16>openvino/int8",
        "torch:float32>openvino/int8@0",
    ):
        with pytest.raises(ValueError, match="FIRST@DEPTH"):
            bench.parse_matrix(bad)


def test_pure_compute_of_a_cascade_is_both_passes(bert_ce_dir: Path, tmp_path: Path) -> None:
    """The lone request's pure compute under a cascade: every pair through the first pass, then the
    first pass's top DEPTH (and only they) through the served precision."""
    from tests.fakes import RecordingScorer

    docs = [(f"d{i}", "", " ".join(["word"] * (3 + i))) for i in range(8)]
    flags = ["--runtime", "torch", "--dtype", "float32", "--cascade", "openvino/int8", "--cascade-depth", "3"]
    compute = bench.PureCompute(bert_ce_dir, [*flags, "--export-cache-dir", str(tmp_path)], ("q", docs))
    rec = compute.scorer = RecordingScorer(compute.scorer)
    compute.run()
    passes = list(zip(rec.first_pass_batches, rec.batches, strict=True))
    first = [p for flag, b in passes if flag for p in b]
    second = [p for flag, b in passes if not flag for p in b]
    assert sorted(p.document for p in first) == sorted(d for _, _, d in docs)
    fast = rec.inner.score(first, first_pass=True)
    top = {first[i].document for i in np.argsort(-fast, kind="stable")[:3]}
    assert {p.document for p in second} == top and len(second) == 3


def test_lone_batches_follow_the_token_budget() -> None:
    tokens = [10, 50, 30, 50, 20]
    batches = bench.lone_batches(tokens, max_tokens=100, max_pairs=3)
    # longest first; a batch holds pairs while (pairs + 1) x its longest fits 100
    assert batches == [[1, 3], [2, 4, 0]]
    assert sorted(i for b in batches for i in b) == list(range(len(tokens)))
    assert all(len(b) * max(tokens[i] for i in b) <= 100 for b in batches)
    # packed without padding (the CUDA path), only real tokens count
    assert bench.lone_batches(tokens, max_tokens=100, max_pairs=3, padding_free=True) == [[1, 3], [2, 4, 0]]
    assert bench.lone_batches(tokens, max_tokens=110, max_pairs=9, padding_free=True) == [[1, 3], [2, 4, 0]]
    assert bench.lone_batches(tokens, max_tokens=155, max_pairs=9, padding_free=True) == [[1, 3, 2, 4], [0]]


def test_a_configuration_serve_refuses_is_reported_with_its_reason(tmp_path: Path, bert_ce_dir: Path) -> None:
    """A real `serve` that exits at start: the report carries its own one-line reason, not a traceback."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--serve-arg=--max-batch-tokens=1"])
    work = [("q", [("d1", "", "a document")])]
    row = bench._measure_config(bench.Config("torch", "float32"), bert_ce_dir, work, args, None, {})
    assert row["status"] == "refused"
    assert row["reason"].startswith("invalid setting max_batch_tokens"), row["reason"]


def test_nothing_runnable_stops_before_timing_anything(
    bert_ce_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        ["--model", str(bert_ce_dir), "--matrix", "onnxruntime:float32,onnxruntime:int8"]
    )
    assert bench.main(args) == 1
    out, err = capsys.readouterr()
    assert out.count("skipped: onnxruntime cannot be imported") == 2
    assert "nothing to benchmark on this machine" in err and "ceiling" not in out


def test_a_configuration_whose_requests_fail_is_reported_and_stopped(
    tmp_path: Path, bert_ce_dir: Path
) -> None:
    """A sidecar that serves but answers every bench request with an error (3 documents, at most 2)."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--serve-arg=--max-documents=2", "--concurrency", "2"])
    work = [("q", [(f"d{i}", "", f"document {i}") for i in range(3)])] * 2
    with progress_display(Console(file=io.StringIO())) as progress:
        row = bench._measure_config(bench.Config("torch", "float32"), bert_ce_dir, work, args, progress, {})
    assert row["status"] == "failed"
    assert row["reason"].startswith("a request failed: INVALID_ARGUMENT"), row["reason"]
    assert _serve_children() == []
