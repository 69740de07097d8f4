"""Partial results (issue 15 item 1), seen from real clients on real servers: a request that opted in is
scored in first-stage order, and at its deadline gets the pairs scored so far (RERANKED, the model's own
scores) with the rest below them in first-stage order (FALLBACK "deadline"); one that did not opt in
still gets DEADLINE_EXCEEDED / 504. The gate lets exactly the batches a test names reach the model."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from sidecar.client import RerankerClient
from sidecar.scoring.base import Pair, Scorer
from sidecar.types import Document, HitStatus
from tests.conftest import make_scorer, test_settings
from tests.fakes import BatchGate, RecordingScorer, SlowMeasureScorer
from tests.texts import documents

# First-stage scores not in input order: first-stage order is 5, 2, 7, 0, 3, 6, 1, 4.
FIRST_STAGE = [5.0, 1.0, 9.0, 4.0, 0.5, 9.5, 2.0, 6.0]
FIRST_STAGE_ORDER = sorted(range(len(FIRST_STAGE)), key=lambda i: -FIRST_STAGE[i])
# Lengths rising with the index (all under the model's 64 tokens), so that scoring longest first, as the
# batcher does for other requests, would not be first-stage order.
TEXTS = [" ".join(t.split()[: 6 + 4 * i]) for i, t in enumerate(documents(len(FIRST_STAGE)))]
# Two pairs a batch, no waiting for more: each batch the gate lets through scores two more of the head.
SETTINGS = {"warmup": False, "max_wait_ms": 0, "max_batch_pairs": 2, "partial_results_margin_ms": 50}


@pytest.fixture(scope="module")
def fp32_scorer(bert_ce_dir: Path) -> Scorer:
    # float32 pinned: the answer's scores are compared with the scorer's own.
    return make_scorer(bert_ce_dir, dtype="float32")


def _docs(scored: bool = True) -> list[Document]:
    return [
        Document(text=t, id=f"d{i}", first_stage_score=FIRST_STAGE[i] if scored else None)
        for i, t in enumerate(TEXTS)
    ]


def _which(pair: Pair) -> int:
    """The document a pair that reached the model came from (the model gets it clipped to its limit)."""
    return next(i for i, t in enumerate(TEXTS) if t.startswith(pair.document[:200]))


def _reference(scorer: Scorer, indices: list[int]) -> dict[int, float]:
    scores = scorer.score([Pair("q", TEXTS[i]) for i in indices])
    return {i: float(s) for i, s in zip(indices, scores, strict=True)}


def _post(port: int, path: str, body: dict[str, Any], timeout_ms: int) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "x-rerank-timeout-ms": str(timeout_ms)},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read())


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_grpc_partial_answer_scores_the_head_first(server_factory, fp32_scorer: Scorer) -> None:
    gate = BatchGate()
    rec = RecordingScorer(fp32_scorer, gate)
    srv = server_factory(test_settings(**SETTINGS), scorer=rec)
    port = srv.server.http_port
    gate.allow(2)  # two batches (the first-stage top 4) reach the model; the third is held past the deadline
    try:
        with RerankerClient(srv.target) as client:
            result = client.rerank("q", _docs(), timeout=1.5, partial_results=True)
    finally:
        gate.open()
    head, rest = FIRST_STAGE_ORDER[:4], FIRST_STAGE_ORDER[4:]
    # Scheduled in first-stage order: each batch is the next two of the head.
    assert [sorted(_which(p) for p in b) for b in rec.batches[:3]] == [
        sorted(FIRST_STAGE_ORDER[k : k + 2]) for k in (0, 2, 4)
    ]
    scored = [h for h in result.hits if h.status is HitStatus.RERANKED]
    fallback = [h for h in result.hits if h.status is HitStatus.FALLBACK]
    assert result.hits == scored + fallback  # the scored hits first
    assert sorted(h.index for h in scored) == sorted(head)
    reference = _reference(fp32_scorer, head)
    for h in scored:
        assert h.score == pytest.approx(reference[h.index], abs=1e-5)
    assert [h.index for h in scored] == sorted(head, key=lambda i: -reference[i])
    # The unscored rest (the held batch included) below them, in first-stage order.
    assert [h.index for h in fallback] == rest
    assert {h.fallback_reason for h in fallback} == {"deadline"}
    ranking = [h.ranking_score for h in result.hits]
    assert ranking == sorted(ranking, reverse=True) and len(set(ranking)) == len(ranking)
    assert _metric(port, "reranker_partial_answers_total") == 1.0
    assert _metric(port, "reranker_partial_fallback_hits_total") == 4.0
    assert _metric(port, 'reranker_fallback_total{reason="deadline"}') == 1.0


def test_without_the_option_the_deadline_is_an_error(server_factory, fp32_scorer: Scorer) -> None:
    gate = BatchGate()  # nothing reaches the model
    srv = server_factory(test_settings(**SETTINGS), scorer=RecordingScorer(fp32_scorer, gate))
    body = {"query": "q", "documents": [{"text": t} for t in TEXTS]}
    try:
        with RerankerClient(srv.target) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.rerank("q", _docs(), timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        status, headers, error = _post(srv.server.http_port, "/v1/rerank", body, 300)
        assert status == 504 and "x-rerank-fallback" not in headers, error
        status, _, error = _post(srv.server.http_port, "/v1/rerank", {**body, "partial_results": 1}, 300)
        assert status == 422 and "partial_results" in error["error"]["message"]
    finally:
        gate.open()
    assert _metric(srv.server.http_port, "reranker_partial_answers_total") == 0.0


def test_server_default_and_every_http_shape(server_factory, fp32_scorer: Scorer) -> None:
    """With the server default on, each HTTP shape answers 200 with one batch (2 pairs) scored; the
    ml-commons shapes stay what OpenSearch parses, the unscored hits below every scored one."""
    gate = BatchGate()
    rec = RecordingScorer(fp32_scorer, gate)
    srv = server_factory(
        test_settings(**SETTINGS, partial_results=True, score_cache_bytes=1 << 20), scorer=rec
    )
    port = srv.server.http_port
    # No first-stage scores: first-stage order is the input order, so the head is documents 0 and 1.
    body = {"query": "q", "documents": TEXTS}
    reference = _reference(fp32_scorer, [0, 1])
    head_order = sorted([0, 1], key=lambda i: -reference[i])
    try:
        # One batch through; afterwards the previous request's held batch needs a permit too.
        for k, path in enumerate(["/v1/rerank", "/v1/opensearch/rerank", "/v1/opensearch/scores"]):
            gate.allow(1 if k == 0 else 2)
            # The last one reads and writes the score cache (checked below), the others bypass it.
            status, headers, answer = _post(port, path, {**body, "bypass_cache": k < 2}, 700)
            assert status == 200, answer
            assert headers["x-rerank-fallback"] == "6" and headers["x-rerank-fallback-reason"] == "deadline"
            if path == "/v1/rerank":
                results = answer["results"]
                assert [r["index"] for r in results] == [*head_order, 2, 3, 4, 5, 6, 7]
                assert "fallback_reason" not in results[0] and results[2]["fallback_reason"] == "deadline"
                for r in results[:2]:
                    assert r["rerank_score"] == pytest.approx(reference[r["index"]], abs=1e-5)
            elif path == "/v1/opensearch/rerank":
                assert all(
                    isinstance(r["index"], int) and isinstance(r["relevance_score"], float) for r in answer
                )
                ranked = sorted(answer, key=lambda r: -r["relevance_score"])
                assert [r["index"] for r in ranked] == [*head_order, 2, 3, 4, 5, 6, 7]
            else:
                values = answer["scores"]  # input order, one per document
                assert len(values) == len(TEXTS) and all(isinstance(s, float) for s in values)
                assert values[:2] == pytest.approx([reference[0], reference[1]], abs=1e-5)
                assert max(values[2:]) < min(values[:2])
                assert sorted(range(len(values)), key=lambda i: -values[i]) == [*head_order, 2, 3, 4, 5, 6, 7]
        # The request's own option overrides the server default.
        gate.allow(2)
        status, _, error = _post(
            port, "/v1/rerank", {**body, "partial_results": False, "bypass_cache": True}, 300
        )
        assert status == 504, error
    finally:
        gate.open()
    assert _metric(port, "reranker_partial_answers_total") == 3.0
    # Scored pairs are kept: a repeat of the request answers them from the score cache, no forward pass.
    before = len(rec.seen)
    status, headers, answer = _post(port, "/v1/rerank", body, 5000)
    assert status == 200 and headers["x-rerank-cached"] == "2"
    assert len(rec.seen) - before == len(TEXTS) - 2
    assert all("fallback_reason" not in r for r in answer["results"])
    assert np.isfinite([r["relevance_score"] for r in answer["results"]]).all()


def test_the_answer_comes_at_the_deadline_while_still_tokenizing(server_factory, fp32_scorer: Scorer) -> None:
    """Tokenizing that outlasts the deadline still gets the partial answer in time: nothing scored,
    every hit FALLBACK "deadline" in first-stage order, and no pair reaches the model."""
    measure_gate = threading.Event()
    rec = SlowMeasureScorer(fp32_scorer, measure_gate)
    srv = server_factory(test_settings(**SETTINGS), scorer=rec)
    body = {
        "query": "q",
        "documents": [{"text": t, "first_stage_score": f} for t, f in zip(TEXTS, FIRST_STAGE, strict=True)],
    }
    try:
        status, headers, answer = _post(
            srv.server.http_port, "/v1/opensearch/rerank", {**body, "partial_results": True}, 400
        )
    finally:
        measure_gate.set()
    assert status == 200, answer
    assert headers["x-rerank-fallback"] == str(len(TEXTS))
    assert [r["index"] for r in answer] == FIRST_STAGE_ORDER
    assert {r["fallback_reason"] for r in answer} == {"deadline"}
    values = [r["relevance_score"] for r in answer]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)
    assert rec.batches == []


def test_a_request_with_split_documents_is_answered_whole(server_factory, fp32_scorer: Scorer) -> None:
    """Long-document windows and partial results together (README "Partial results"): a document is
    scored only with all its windows, so a request whose documents were split is answered whole when it
    can be, and at its deadline fails as without the option instead of returning half-scored documents."""
    long_doc = " ".join(documents(4))  # far past the tiny model's 64 tokens: several windows
    docs = [
        Document(text=long_doc, id="long", first_stage_score=2.0),
        Document(text="short", id="s", first_stage_score=1.0),
    ]
    settings = test_settings(long_documents="windows", partial_results=True, warmup=False, max_wait_ms=0)
    srv = server_factory(settings, scorer=fp32_scorer)
    with RerankerClient(srv.target) as client:
        whole = client.rerank("q", docs)
    assert all(h.status == HitStatus.RERANKED for h in whole.hits)
    assert max(h.windows for h in whole.hits) > 1

    gate = threading.Event()  # holds the model: nothing is scored before the deadline
    held = server_factory(settings, scorer=RecordingScorer(fp32_scorer, gate))
    try:
        with RerankerClient(held.target) as client, pytest.raises(grpc.RpcError) as info:
            client.rerank("q", docs, timeout=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        gate.set()
