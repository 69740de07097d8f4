"""The replay against a real in-process sidecar (packaged model), the reranked run's construction, fail-open
on a dead sidecar, and every output file the report writes."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.eval import metrics as m
from sidecar.eval import report
from sidecar.eval.bm25 import LuceneBm25
from sidecar.eval.datasets import Dataset
from sidecar.eval.first_stage import Hit
from sidecar.eval.replay import QueryRecord, ReplayConfig, ReplayResult, replay
from sidecar.eval.rerankers import GrpcReranker, RerankOutput
from sidecar.launch import free_port
from sidecar.scoring.base import Scorer
from tests.conftest import ServerThread, test_settings

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_bm25(tiny: Dataset, tmp_path: Path) -> Iterator[LuceneBm25]:
    stage = LuceneBm25(tiny, cache_root=tmp_path / "cache")
    yield stage
    stage.close()


@pytest.fixture
def sidecar(packaged_scorer: Scorer) -> Iterator[ServerThread]:
    srv = ServerThread(test_settings(), packaged_scorer)
    yield srv
    srv.stop(grace=1.0)


def test_replay_through_the_sidecar_and_report(
    tiny: Dataset, tiny_bm25: LuceneBm25, sidecar: ServerThread, tmp_path: Path
) -> None:
    reranker = GrpcReranker(sidecar.target)
    try:
        config = ReplayConfig(hits=5, depth=3, concurrency=2, warmup=1)
        result = replay(tiny, tiny.query_ids(), tiny_bm25, reranker, config)
        summary = report.build_result(
            tiny,
            result,
            first_stage=tiny_bm25.describe(),
            rerank=reranker.describe(),
            command=["rerank-sidecar", "replay"],
        )
        files = report.write_outputs(tmp_path / "out", tiny, result, summary)

        # The reranked head is exactly the order the sidecar returns for the same candidates.
        rec = result.records["q2"]
        assert rec.rerank is not None and rec.error is None
        cands = [(h.doc_id, tiny.corpus[h.doc_id], h.score) for h in rec.first_stage[:3]]
        direct = reranker.rerank(tiny.queries["q2"], cands)
        rr_run, _ = result.reranked_run()
        assert [d for d, _ in rr_run["q2"][: len(direct.ranking)]] == [d for d, _ in direct.ranking]
        assert rec.rerank.server_inference_seconds is not None
    finally:
        reranker.close()

    out = tmp_path / "out"
    assert summary["rerank"]["model_id"]  # the Info call named the model
    assert summary["throughput"]["pairs"] == sum(len(r.candidates) for r in result.records.values()) > 0
    for key in ("first_stage", "rerank", "server_inference", "end_to_end"):
        assert summary["latency"][key]["count"] == 3
    assert (
        summary["comparison"]["ndcg@10"]["wins"]
        + summary["comparison"]["ndcg@10"]["losses"]
        + summary["comparison"]["ndcg@10"]["ties"]
        == 3
    )
    # Files: all present, non-empty; the JSON's numbers are what trec_eval reads back from the run files.
    for name in files.values():
        assert (out / name).stat().st_size > 0, name
    stored = json.loads((out / report.RESULT_JSON).read_text())
    for stage, run_file in (("first_stage", report.RUN_FIRST_STAGE), ("reranked", report.RUN_RERANKED)):
        again = m.aggregate(m.evaluate(tiny.qrels, report.read_trec_run(out / run_file), tiny.query_ids()))
        for k, v in again.items():
            assert stored["metrics"][stage][k] == pytest.approx(v, abs=1e-6), (stage, k)
    md = (out / report.REPORT_MD).read_text()
    assert f"{stored['comparison']['ndcg@10']['reranked']:.4f}" in md
    assert "![latency per stage](latency.png)" in md
    for png in (report.LATENCY_PNG, report.DELTA_PNG):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_dead_sidecar_fails_open_to_first_stage_order(tiny: Dataset, tiny_bm25: LuceneBm25) -> None:
    reranker = GrpcReranker(f"127.0.0.1:{free_port()}", timeout=5.0)  # nothing listens there
    try:
        result = replay(tiny, tiny.query_ids(), tiny_bm25, reranker, ReplayConfig(hits=5, depth=3))
    finally:
        reranker.close()
    assert set(result.rerank_errors) == set(tiny.query_ids())
    assert all("UNAVAILABLE" in e for e in result.rerank_errors.values())
    rr_run, _ = result.reranked_run()
    assert rr_run == result.first_stage_run()
    summary = report.build_result(tiny, result, first_stage=tiny_bm25.describe(), rerank={"api": "grpc"})
    assert summary["errors"]["rerank_errors"] == 3
    assert summary["metrics"]["reranked"] == summary["metrics"]["first_stage"]
    assert "rerank" not in summary["latency"] or summary["latency"]["rerank"] == {"count": 0}


def test_reranked_run_puts_the_first_stage_tail_after_the_reranked_head() -> None:
    hits = [Hit(d, s) for d, s in (("a", 9.0), ("b", 8.0), ("c", 7.0), ("d", 6.0), ("e", 5.0))]
    rec = QueryRecord(
        "q",
        hits,
        0.01,
        0.02,
        candidates=["a", "b", "c"],
        rerank=RerankOutput(ranking=[("c", 0.8), ("a", 0.8), ("b", 0.1)]),
        rerank_seconds=0.01,
    )
    result = ReplayResult(["q"], {"q": rec}, 0.02, ReplayConfig(hits=5, depth=3), reranked=True)
    run, nudged = result.reranked_run()
    assert [d for d, _ in run["q"]] == ["c", "a", "b", "d", "e"]
    scores = [s for _, s in run["q"]]
    assert all(x > y for x, y in itertools.pairwise(scores))
    assert scores[0] == 0.8 and scores[2] == 0.1  # model scores kept; only the tie was nudged
    assert nudged == 1
    assert [d for d, _ in m.trec_order(run["q"])] == ["c", "a", "b", "d", "e"]
    assert result.pairs == 3


def test_open_loop_spaces_queries_by_the_offered_rate(tiny: Dataset, tiny_bm25: LuceneBm25) -> None:
    qps = 20.0
    result = replay(
        tiny, tiny.query_ids(), tiny_bm25, None, ReplayConfig(hits=5, depth=0, concurrency=3, qps=qps)
    )
    # Query i is not sent before start + i / qps, whatever the concurrency.
    assert result.wall_seconds >= (len(tiny.query_ids()) - 1) / qps
    assert all(r.rerank is None and r.e2e_seconds >= r.first_stage_seconds for r in result.records.values())
    assert not result.reranked
