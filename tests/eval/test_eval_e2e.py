"""The one-command replay end to end: the CLI starts a real sidecar process (packaged model), replays a
SciFact slice through BM25 and the sidecar, and writes everything; plus HTTP against a real server."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sidecar.eval import metrics as m
from sidecar.eval import report
from sidecar.eval.__main__ import main
from sidecar.eval.datasets import Dataset
from sidecar.scoring.base import Scorer
from tests.conftest import ServerThread, test_settings

pytestmark = pytest.mark.slow

QUERIES, DEPTH, HITS = 20, 10, 100


@pytest.fixture(scope="module")
def replayed(
    scifact_dir: Path, eval_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, int]]:
    out = tmp_path_factory.mktemp("replay") / "scifact-slice"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RERANK_CACHE_DIR", str(eval_cache))  # --cache-dir sets it for the process; restored after
        rc = main(
            [
                "replay",
                "--dataset-dir",
                str(scifact_dir),
                "--cache-dir",
                str(eval_cache),
                "--max-queries",
                str(QUERIES),
                "--depth",
                str(DEPTH),
                "--hits",
                str(HITS),
                "--warmup",
                "1",
                "--concurrency",
                "2",
                "--output",
                str(out),
            ]
        )
    yield out, rc


def test_one_command_replay_writes_everything(
    replayed: tuple[Path, int], capsys: pytest.CaptureFixture[str]
) -> None:
    out, rc = replayed
    assert rc == 0
    for name in (
        report.RUN_FIRST_STAGE,
        report.RUN_RERANKED,
        report.RESULT_JSON,
        report.REPORT_MD,
        report.LATENCY_PNG,
        report.DELTA_PNG,
        "sidecar.log",
    ):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / report.RESULT_JSON).read_text())
    assert result["dataset"]["queries"] == QUERIES
    assert result["config"]["depth"] == DEPTH
    assert result["rerank"]["model_id"].startswith("sentence-transformers/all-MiniLM-L6-v2")
    assert result["errors"]["rerank_errors"] == 0
    assert result["throughput"]["pairs"] == QUERIES * DEPTH
    for stage in ("first_stage", "rerank", "server_queue", "server_inference", "end_to_end"):
        assert result["latency"][stage]["count"] == QUERIES, stage
    md = (out / report.REPORT_MD).read_text()
    assert f"{result['metrics']['reranked']['ndcg@10']:.4f}" in md


def test_reranked_metrics_come_from_the_reranked_order(replayed: tuple[Path, int], scifact: Dataset) -> None:
    out, _ = replayed
    result = json.loads((out / report.RESULT_JSON).read_text())
    first = report.read_trec_run(out / report.RUN_FIRST_STAGE)
    reranked = report.read_trec_run(out / report.RUN_RERANKED)
    qids = list(first)
    assert len(qids) == QUERIES
    moved = 0
    for q in qids:
        head_fs = [d for d, _ in first[q][:DEPTH]]
        head_rr = [d for d, _ in reranked[q][:DEPTH]]
        assert sorted(head_rr) == sorted(head_fs)  # the reranked head is a permutation of the candidates
        assert [d for d, _ in reranked[q][DEPTH:]] == [d for d, _ in first[q][DEPTH:]]  # tail kept in order
        assert [d for d, _ in m.trec_order(reranked[q])] == [
            d for d, _ in reranked[q]
        ]  # scores agree with ranks
        moved += head_rr != head_fs
    assert moved > 0
    # Scores in result.json are exactly what trec_eval reads from the run files.
    for stage, run in (("first_stage", first), ("reranked", reranked)):
        again = m.aggregate(m.evaluate(scifact.qrels, run, qids, report.metric_names(HITS)))
        assert result["metrics"][stage] == pytest.approx(again, abs=1e-6)


def test_reranked_order_matches_the_reference_model(replayed: tuple[Path, int], scifact: Dataset) -> None:
    """Independent check of the sidecar's order: sentence-transformers' cosine scores of the same pairs must
    not increase along the reranked head (beyond float noise)."""
    from sentence_transformers import SentenceTransformer

    from sidecar.eval.dense import packaged_model_dir

    out, _ = replayed
    reranked = report.read_trec_run(out / report.RUN_RERANKED)
    model = SentenceTransformer(str(packaged_model_dir()), device="cpu")
    for q in list(reranked)[:3]:
        head = [d for d, _ in reranked[q][:DEPTH]]
        emb = model.encode(
            [scifact.queries[q]] + [scifact.corpus[d].joined() for d in head], normalize_embeddings=True
        )
        scores = emb[1:] @ emb[0]
        assert np.all(np.diff(scores) <= 1e-4), (q, scores)


@pytest.fixture
def sidecar_with_http(packaged_scorer: Scorer) -> Iterator[ServerThread]:
    if importlib.util.find_spec("sidecar.http_api") is None:
        pytest.skip("the sidecar's HTTP front end (sidecar.http_api) is not there yet")
    srv = ServerThread(test_settings(), packaged_scorer)
    yield srv
    srv.stop(grace=1.0)


def test_http_api_reranks_like_grpc(sidecar_with_http: ServerThread, tiny: Dataset, tmp_path: Path) -> None:
    from sidecar.eval.bm25 import LuceneBm25
    from sidecar.eval.replay import ReplayConfig, replay
    from sidecar.eval.rerankers import GrpcReranker, HttpReranker

    stage = LuceneBm25(tiny, cache_root=tmp_path)
    http = HttpReranker(f"http://127.0.0.1:{sidecar_with_http.server.http_port}")
    grpc = GrpcReranker(sidecar_with_http.target)
    try:
        config = ReplayConfig(hits=5, depth=5)
        by_http = replay(tiny, tiny.query_ids(), stage, http, config)
        by_grpc = replay(tiny, tiny.query_ids(), stage, grpc, config)
    finally:
        http.close()
        grpc.close()
        stage.close()
    assert not by_http.rerank_errors
    for q in tiny.query_ids():
        a, b = by_http.records[q].rerank, by_grpc.records[q].rerank
        assert a is not None and b is not None
        assert [d for d, _ in a.ranking] == [d for d, _ in b.ranking]
        assert [s for _, s in a.ranking] == pytest.approx([s for _, s in b.ranking], abs=1e-5)
