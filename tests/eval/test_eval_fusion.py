"""Replay with score fusion: `--fusion` parsing, the rerankers asking for a fusion and reading the model's own
scores back (real servers, tiny random BERT cross-encoder), the no-fusion run and report rows, and one replay
through the CLI with blend alpha 0 (which must give back the first-stage order)."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from sidecar.eval import report
from sidecar.eval.__main__ import main
from sidecar.eval.cli import add_replay_arguments, fusion_option
from sidecar.eval.datasets import Dataset
from sidecar.eval.first_stage import Hit
from sidecar.eval.replay import QueryRecord, ReplayConfig, ReplayResult
from sidecar.eval.rerankers import Candidate, GrpcReranker, HttpReranker, RerankOutput
from sidecar.fusion import NO_FUSION, FusionMethod, FusionSpec, Normalization
from sidecar.scoring.base import Scorer
from tests.conftest import ServerThread, test_settings
from tests.eval.beir_helpers import write_beir

BLEND_0 = {"method": "blend", "alpha": 0.0, "normalization": "minmax"}


# ---- --fusion parsing ---------------------------------------------------------------------------
def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_replay_arguments(p)
    return p.parse_args(list(argv))


def test_fusion_option_names_methods_and_their_parameters() -> None:
    assert fusion_option(_args()) is None  # server: the request names none
    assert fusion_option(_args("--fusion", "none")) == NO_FUSION
    assert fusion_option(_args("--fusion", "rrf", "--fusion-rrf-k", "10")) == FusionSpec(
        FusionMethod.RRF, rrf_k=10
    )
    assert fusion_option(_args("--fusion", "blend")) == FusionSpec(FusionMethod.BLEND, alpha=0.5)
    assert fusion_option(
        _args("--fusion", "blend", "--fusion-alpha", "0", "--fusion-normalization", "zscore")
    ) == FusionSpec(FusionMethod.BLEND, alpha=0.0, normalization=Normalization.ZSCORE)


def test_fusion_option_reads_a_tuned_fusion_json(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    # The shape `rerank-sidecar tune-fusion` writes: the spec plus where and how it was chosen.
    record = {
        "method": "blend",
        "alpha": 0.3,
        "normalization": "zscore",
        "rrf_k": 60,
        "chosen_on": {"dataset": "scifact", "split": "train"},
        "ndcg@10": {"chosen": 0.7, "no_fusion": 0.68},
        "grid": [],
    }
    (model / "fusion.json").write_text(json.dumps(record))
    expected = FusionSpec(FusionMethod.BLEND, alpha=0.3, normalization=Normalization.ZSCORE)
    assert fusion_option(_args("--fusion", str(model / "fusion.json"))) == expected
    assert fusion_option(_args("--fusion", str(model))) == expected  # a model directory holding one
    other = tmp_path / "tuned.json"  # `tune-fusion --out` may name it anything
    other.write_text(json.dumps({"method": "rrf", "rrf_k": 20}))
    assert fusion_option(_args("--fusion", str(other))) == FusionSpec(FusionMethod.RRF, rrf_k=20)


@pytest.mark.parametrize(
    ("argv", "files", "message"),
    [
        (["--fusion", "blendd"], {}, "neither a method (server, none, rrf, blend) nor a fusion.json"),
        (["--fusion", "{dir}"], {}, "nor a fusion.json file or a directory holding one"),
        (["--fusion", "{dir}/f.json"], {"f.json": "{not json"}, "is not readable JSON"),
        (["--fusion", "{dir}/f.json"], {"f.json": '{"method": "mix"}'}, "'mix': use one of 'none'"),
        (["--fusion", "{dir}/f.json"], {"f.json": '{"method": "blend", "alpha": 2}'}, "alpha=2 is out of"),
        (["--fusion", "{dir}/f.json"], {"f.json": "[1]"}, "must be an object"),
        (
            ["--fusion", "blend", "--fusion-alpha", "1.5"],
            {},
            "--fusion blend: fusion alpha=1.5 is out of range",
        ),
        (["--fusion", "rrf", "--fusion-rrf-k", "0"], {}, "rrf_k=0 is out of range"),
        (["--fusion", "rrf", "--fusion-alpha", "0.3"], {}, "--fusion-alpha applies to --fusion blend only"),
        (["--fusion-normalization", "zscore"], {}, "applies to --fusion blend only (got --fusion server)"),
        (["--fusion", "blend", "--fusion-rrf-k", "5"], {}, "--fusion-rrf-k applies to --fusion rrf only"),
        (["--fusion", "blend", "--api", "none"], {}, "--fusion blend needs --api grpc or http"),
    ],
)
def test_bad_fusion_options_exit_2_with_a_reason(
    argv: list[str],
    files: dict[str, str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    # Refused before any dataset is read or sidecar started.
    assert main(["replay", "--dataset-dir", "/no/such/dir", *argv]) == 2
    assert message in capsys.readouterr().err


# ---- the rerankers against real servers ----------------------------------------------------------
@pytest.fixture
def server(bert_scorer: Scorer) -> Iterator[ServerThread]:
    srv = ServerThread(test_settings(fusion="none"), bert_scorer)
    yield srv
    srv.stop(grace=1.0)


def _candidates(tiny: Dataset) -> list[Candidate]:
    # First-stage order d5, d4, ..., d1 with decreasing scores (and one tie, which must keep this order).
    scores = [9.0, 7.5, 7.5, 3.0, 1.0]
    return [(d, tiny.corpus[d], s) for d, s in zip(("d5", "d4", "d3", "d2", "d1"), scores, strict=True)]


def _reranker(api: str, srv: ServerThread, fusion: FusionSpec | None) -> GrpcReranker | HttpReranker:
    if api == "grpc":
        return GrpcReranker(srv.target, fusion=fusion)
    return HttpReranker(f"http://127.0.0.1:{srv.server.http_port}", fusion=fusion)


@pytest.mark.parametrize("api", ["grpc", "http"])
def test_reranker_asks_for_fusion_and_reads_the_model_scores_back(
    api: str, server: ServerThread, tiny: Dataset
) -> None:
    cands = _candidates(tiny)
    query = "what happens when magma rises"
    plain, blended = _reranker(api, server, NO_FUSION), _reranker(api, server, FusionSpec("blend", alpha=0.0))
    try:
        alone = plain.rerank(query, cands)
        fused = blended.rerank(query, cands)
        assert blended.describe()["fusion_requested"] == BLEND_0
    finally:
        plain.close()
        blended.close()
    # Without fusion nothing extra comes back; the ranking is the model's.
    assert alone.fusion == {"method": "none"} and alone.unfused_ranking is None and not alone.fused
    assert [d for d, _ in alone.ranking] != [d for d, _, _ in cands]  # the model reorders these
    # alpha 0 ranks by the first-stage score alone (ties in request order), with the fused scores.
    assert fused.fusion == BLEND_0 and fused.fused
    assert [d for d, _ in fused.ranking] == [d for d, _, _ in cands]
    assert [s for _, s in fused.ranking] == pytest.approx([1.0, 0.8125, 0.8125, 0.25, 0.0])
    # ... and the unfused ranking is exactly what the model alone gives, scores included.
    assert fused.unfused_ranking is not None
    assert [d for d, _ in fused.unfused_ranking] == [d for d, _ in alone.ranking]
    assert [s for _, s in fused.unfused_ranking] == pytest.approx([s for _, s in alone.ranking], abs=1e-6)


@pytest.mark.parametrize("api", ["grpc", "http"])
def test_server_default_fusion_is_reported_when_the_replay_asks_for_none(
    api: str, bert_scorer: Scorer, tiny: Dataset
) -> None:
    srv = ServerThread(test_settings(fusion="rrf", fusion_rrf_k=5), bert_scorer)
    reranker = _reranker(api, srv, None)
    try:
        out = reranker.rerank("what happens when magma rises", _candidates(tiny))
        assert "fusion_requested" not in reranker.describe()
    finally:
        reranker.close()
        srv.stop(grace=1.0)
    assert out.fusion == {"method": "rrf", "rrf_k": 5}
    assert out.unfused_ranking is not None
    raw = [s for _, s in out.unfused_ranking]
    assert raw == sorted(raw, reverse=True)  # by the model's score
    assert {d for d, _ in out.unfused_ranking} == {d for d, _ in out.ranking}


# ---- the no-fusion run and the report -------------------------------------------------------------
def _result(tiny: Dataset, fusion: dict[str, str] | None, fused: bool) -> ReplayResult:
    """Three judged tiny queries with 4 hits each, 3 reranked. Fused, the relevant document is first;
    by the model alone, second (q1 and q2) or third (q3)."""
    records = {}
    for q, rel in (("q1", "d2"), ("q2", "d3"), ("q3", "d4")):
        others = [d for d in ("d1", "d2", "d3", "d4", "d5") if d != rel]
        hits = [Hit(d, 10.0 - i) for i, d in enumerate([others[0], rel, others[1], others[2]])]
        model = [(others[0], 0.9), (rel, 0.8), (others[1], 0.1)]
        if q == "q3":
            model = [(others[0], 0.9), (others[1], 0.85), (rel, 0.8)]
        ranking = [(rel, 1.0), (others[0], 0.6), (others[1], 0.2)] if fused else model
        rerank = RerankOutput(ranking=ranking, fusion=fusion, unfused_ranking=model if fused else None)
        records[q] = QueryRecord(q, hits, 0.01, 0.02, [h.doc_id for h in hits[:3]], rerank, 0.01)
    return ReplayResult(list(records), records, 0.1, ReplayConfig(hits=4, depth=3), reranked=True)


def _console_text(summary: dict[str, object]) -> str:
    buf = io.StringIO()
    report.print_summary(summary, Console(file=buf, width=160))
    return buf.getvalue()


def test_no_fusion_run_and_report_rows_appear_only_when_the_sidecar_fused(
    tiny: Dataset, tmp_path: Path
) -> None:
    rr = {"api": "grpc", "fusion_requested": BLEND_0}
    fused = _result(tiny, BLEND_0, fused=True)
    summary = report.build_result(tiny, fused, first_stage={"kind": "bm25"}, rerank=rr)
    files = report.write_outputs(tmp_path / "fused", tiny, fused, summary, plots=False)

    assert summary["metrics"]["reranked"]["mrr@10"] == 1.0
    assert summary["metrics"]["reranked_no_fusion"]["mrr@10"] == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    assert summary["per_query"]["q3"]["reranked_no_fusion"]["mrr@10"] == pytest.approx(1 / 3)
    f = summary["fusion"]
    assert f["requested"] == BLEND_0 and f["applied"] == BLEND_0
    assert f["applied_name"] == "blend(alpha=0, minmax)"
    assert (f["queries_fused"], f["queries_not_fused"]) == (3, 0)
    c = f["comparison"]["mrr@10"]
    assert (c["wins"], c["losses"], c["ties"]) == (3, 0, 0)
    assert c["delta"] == pytest.approx(1.0 - summary["metrics"]["reranked_no_fusion"]["mrr@10"], abs=1e-6)
    assert c["reranked_no_fusion"] == summary["metrics"]["reranked_no_fusion"]["mrr@10"]

    # The no-fusion run file: the model's order, then the same first-stage tail.
    assert files["run_reranked_no_fusion"] == report.RUN_RERANKED_NO_FUSION
    nf = report.read_trec_run(tmp_path / "fused" / report.RUN_RERANKED_NO_FUSION)
    assert [d for d, _ in nf["q3"]] == ["d1", "d2", "d4", "d3"]
    md = (tmp_path / "fused" / report.REPORT_MD).read_text()
    assert "| metric | first stage | reranked (fused) |" in md
    assert (
        "### Score fusion" in md and "blend(alpha=0, minmax) on 3 of 3 reranked queries (as requested)" in md
    )
    assert "| metric | reranked, no fusion | reranked (fused) |" in md
    assert f"| mrr@10 | {c['reranked_no_fusion']:.4f} | 1.0000 | {c['delta']:+.4f} | 3 / 0 / 0 |" in md
    text = _console_text(summary)
    assert (
        "fusion: blend(alpha=0, minmax) on 3 of 3 reranked queries (as requested); fused vs the model" in text
    )
    assert "no fusion" in text

    # Fusion `none` applied (or a server that does not say): no trace of fusion, the report as it always was.
    for fusion in ({"method": "none"}, None):
        plain = _result(tiny, fusion, fused=False)
        s = report.build_result(tiny, plain, first_stage={"kind": "bm25"}, rerank={"api": "grpc"})
        out = tmp_path / f"plain-{fusion is None}"
        report.write_outputs(out, tiny, plain, s, plots=False)
        assert "fusion" not in s and "reranked_no_fusion" not in s["metrics"]
        assert all("reranked_no_fusion" not in v for v in s["per_query"].values())
        assert not (out / report.RUN_RERANKED_NO_FUSION).exists()
        md = (out / report.REPORT_MD).read_text()
        assert "fusion" not in md.lower()
        assert "| metric | first stage | reranked | Δ |" in md
        assert "fusion" not in _console_text(s).lower()
    # The fused replay's no-fusion run is the plain replay's reranked run.
    assert nf == report.read_trec_run(tmp_path / "plain-True" / report.RUN_RERANKED)


def test_reranked_run_falls_back_to_the_fused_ranking_where_there_is_no_unfused_one() -> None:
    hits = [Hit(d, s) for d, s in (("a", 3.0), ("b", 2.0), ("c", 1.0))]
    fused = RerankOutput(ranking=[("b", 1.0), ("a", 0.5)], unfused_ranking=[("a", 0.2), ("b", 0.1)])
    plain = RerankOutput(ranking=[("b", 0.9), ("a", 0.4)])
    records = {
        "q1": QueryRecord("q1", hits, 0.0, 0.0, ["a", "b"], fused, 0.0),
        "q2": QueryRecord("q2", hits, 0.0, 0.0, ["a", "b"], plain, 0.0),
        "q3": QueryRecord("q3", hits, 0.0, 0.0, ["a", "b"], None, 0.0, error="UNAVAILABLE"),
    }
    result = ReplayResult(list(records), records, 0.0, ReplayConfig(hits=3, depth=2), reranked=True)
    run, _ = result.reranked_run(unfused=True)
    assert [d for d, _ in run["q1"]] == ["a", "b", "c"]
    assert [d for d, _ in run["q2"]] == ["b", "a", "c"]
    assert run["q3"] == [("a", 3.0), ("b", 2.0), ("c", 1.0)]  # failed: first-stage order, fail-open
    assert [d for d, _ in result.reranked_run()[0]["q1"]] == ["b", "a", "c"]


# ---- one replay through the CLI, with and without fusion ------------------------------------------
# Every document holds "dogs", so BM25 returns all of them for every query and the reranker has a list to
# reorder (the random tiny model disagrees with BM25).
DOGS_CORPUS: list[dict[str, object]] = [
    {"_id": f"d{i}", "title": title, "text": text}
    for i, (title, text) in enumerate(
        [
            ("Barking", "Dogs bark at night to warn of strangers; dogs hear far more than we do."),
            ("Food", "What dogs eat: meat, some vegetables, never chocolate."),
            ("Speed", "Greyhounds are the fastest dogs and run at seventy kilometres an hour."),
            ("Sleep", "Dogs sleep twelve hours a day."),
            ("Breeds", "Dogs dogs dogs: a list of breed names."),
            ("Cats", "Cats are not dogs."),
        ],
        1,
    )
]
DOGS_QUERIES: list[dict[str, object]] = [
    {"_id": "q1", "text": "why do dogs bark at night"},
    {"_id": "q2", "text": "what do dogs eat"},
    {"_id": "q3", "text": "how fast can dogs run"},
]
DOGS_QRELS = [("q1", "d1", 1), ("q2", "d2", 1), ("q3", "d3", 1)]


@pytest.mark.slow
def test_replay_with_blend_alpha_0_gives_the_first_stage_order_and_the_plain_reranking(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_beir(tmp_path / "dogs", corpus=DOGS_CORPUS, queries=DOGS_QUERIES, qrels=DOGS_QRELS)
    monkeypatch.setenv("RERANK_CACHE_DIR", str(tmp_path / "cache"))  # --cache-dir sets it; restored after
    common = ["replay", "--dataset-dir", str(data), "--cache-dir", str(tmp_path / "cache")]
    common += ["--target", server.target, "--hits", "6", "--depth", "4", "--warmup", "0", "--no-plots"]
    blend, plain = tmp_path / "blend", tmp_path / "plain"
    assert main([*common, "--fusion", "blend", "--fusion-alpha", "0", "--output", str(blend)]) == 0
    assert main([*common, "--fusion", "none", "--output", str(plain)]) == 0
    assert "no fusion" in capsys.readouterr().out  # the console's fused vs unfused table

    def order(run_dir: Path, name: str) -> dict[str, list[str]]:
        return {q: [d for d, _ in r] for q, r in report.read_trec_run(run_dir / name).items()}

    first_stage = order(blend, report.RUN_FIRST_STAGE)
    assert all(len(v) == 6 for v in first_stage.values())
    # alpha 0: the fused ranking is the first stage's, head and tail.
    assert order(blend, report.RUN_RERANKED) == first_stage
    # The same replay ranked by the model alone is the no-fusion replay's reranked run, scores included.
    no_fusion = report.read_trec_run(blend / report.RUN_RERANKED_NO_FUSION)
    assert no_fusion == report.read_trec_run(plain / report.RUN_RERANKED)
    assert {q: [d for d, _ in r] for q, r in no_fusion.items()} != first_stage

    fused, unfused = (json.loads((d / report.RESULT_JSON).read_text()) for d in (blend, plain))
    assert fused["rerank"]["fusion_requested"] == BLEND_0
    assert fused["fusion"]["applied"] == BLEND_0 and fused["fusion"]["queries_fused"] == 3
    assert fused["metrics"]["reranked_no_fusion"] == unfused["metrics"]["reranked"]
    assert "fusion" not in unfused and not (plain / report.RUN_RERANKED_NO_FUSION).exists()
    assert "reranked, no fusion" in (blend / report.REPORT_MD).read_text()
    assert "no fusion" not in (plain / report.REPORT_MD).read_text()
