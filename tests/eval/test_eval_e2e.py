"""`make demo`'s code path on a slice: `rerank-sidecar replay` with its defaults (BM25 -> a local sidecar
process serving the packaged model with its shipped fusion weights) as a subprocess whose output is not a
terminal, as in CI; plus HTTP against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sidecar.eval import metrics as m
from sidecar.eval import report
from sidecar.eval.datasets import Dataset
from sidecar.scoring.base import Scorer
from tests.conftest import ServerThread, test_settings

pytestmark = pytest.mark.slow

QUERIES, DEPTH, HITS = 20, 10, 100
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def replayed(
    scifact_dir: Path, eval_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, subprocess.CompletedProcess[str]]]:
    out = tmp_path_factory.mktemp("replay") / "scifact-slice"
    argv = ["replay", "--dataset-dir", str(scifact_dir), "--cache-dir", str(eval_cache)]
    argv += ["--max-queries", str(QUERIES), "--depth", str(DEPTH), "--hits", str(HITS)]
    argv += ["--warmup", "1", "--concurrency", "2", "--output", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", *argv],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    yield out, done


def test_one_command_replay_writes_everything(
    replayed: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, done = replayed
    assert done.returncode == 0, done.stderr[-3000:]
    for name in (
        report.RUN_FIRST_STAGE,
        report.RUN_RERANKED,
        report.RUN_RERANKED_NO_FUSION,
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
    # The packaged model's shipped fusion applied by default, and the model alone is reported beside it.
    assert result["fusion"]["applied"] == {"method": "blend", "alpha": 0.7, "normalization": "minmax"}
    assert result["fusion"]["requested"] == "server default"
    assert "reranked_no_fusion" in result["metrics"]
    md = (out / report.REPORT_MD).read_text()
    assert f"{result['metrics']['reranked']['ndcg@10']:.4f}" in md


def test_the_report_opens_with_a_verdict(replayed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, done = replayed
    result = json.loads((out / report.RESULT_JSON).read_text())
    c = result["comparison"]["ndcg@10"]
    assert result["verdict"].startswith("Verdict: reranking fused with the first stage (blend(alpha=0.7")
    assert (
        f"from {c['first_stage']:.4f} to {c['reranked']:.4f} ({c['delta']:+.4f}, 95% CI" in result["verdict"]
    )
    assert ("a significant" in result["verdict"]) == (c["t_test_p"] < 0.05)
    stdout = done.stdout.splitlines()
    assert stdout[1] == result["verdict"]  # right under the title line
    assert (out / report.REPORT_MD).read_text().splitlines()[2] == f"**{result['verdict']}**"


def test_progress_is_logged_when_output_is_not_a_terminal(
    replayed: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    _, done = replayed
    lines = done.stderr.splitlines()
    assert f"replaying {QUERIES} queries ({QUERIES}) ..." in lines
    assert any(line.startswith(f"replaying {QUERIES} queries: done, {QUERIES} in ") for line in lines)


def test_document_embeddings_persist_in_the_cache(
    replayed: tuple[Path, subprocess.CompletedProcess[str]], eval_cache: Path
) -> None:
    stores = list((eval_cache / "embeddings").glob("*.sqlite"))
    assert len(stores) == 1 and stores[0].stat().st_size > 0


def test_reranked_metrics_come_from_the_reranked_order(
    replayed: tuple[Path, subprocess.CompletedProcess[str]], scifact: Dataset
) -> None:
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


def test_reranked_order_matches_the_reference_model(
    replayed: tuple[Path, subprocess.CompletedProcess[str]], scifact: Dataset
) -> None:
    """Independent check of the sidecar's order: sentence-transformers' cosines of the same pairs order the
    model-only run, and the blend written out here (alpha 0.7 of min-max cosine, 0.3 of min-max BM25) gives
    the fused run's scores."""
    from sentence_transformers import SentenceTransformer

    from sidecar.eval.dense import packaged_model_dir

    out, _ = replayed
    first = report.read_trec_run(out / report.RUN_FIRST_STAGE)
    fused = report.read_trec_run(out / report.RUN_RERANKED)
    alone = report.read_trec_run(out / report.RUN_RERANKED_NO_FUSION)
    model = SentenceTransformer(str(packaged_model_dir()), device="cpu")

    def minmax(x: np.ndarray) -> np.ndarray:
        return (x - x.min()) / (x.max() - x.min())

    for q in list(fused)[:3]:
        head = [d for d, _ in first[q][:DEPTH]]
        emb = model.encode(
            [scifact.queries[q]] + [scifact.corpus[d].joined() for d in head], normalize_embeddings=True
        )
        cosine = dict(zip(head, emb[1:] @ emb[0], strict=True))
        order = [d for d, _ in alone[q][:DEPTH]]
        assert np.all(np.diff([cosine[d] for d in order]) <= 1e-4), q
        bm25 = np.array([s for _, s in first[q][:DEPTH]])
        blend = 0.7 * minmax(np.array([cosine[d] for d in head])) + 0.3 * minmax(bm25)
        expected = dict(zip(head, blend, strict=True))
        for d, score in fused[q][:DEPTH]:
            assert score == pytest.approx(expected[d], abs=1e-3), (q, d)


@pytest.fixture
def sidecar_with_http(packaged_scorer: Scorer) -> Iterator[ServerThread]:
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
