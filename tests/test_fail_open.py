"""Fail-open (issue 15 item 2), seen from real clients on real servers: when nothing can be scored
(queue full, failed batch, draining, deadline) an opted-in request gets first-stage order, every hit
FALLBACK with the reason (and a header over HTTP), counted; one that did not opt in gets today's error."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar._proto.reranker.v1 import reranker_pb2_grpc as pb_grpc
from sidecar.client import RerankerClient
from sidecar.scoring.base import Scorer
from sidecar.types import Document, HitStatus
from tests.conftest import ServerThread, test_settings
from tests.fakes import FailingScorer, RecordingScorer
from tests.texts import documents

# First-stage scores deliberately not in input order: first-stage order is 2, 0, 3, 1, 4.
FIRST_STAGE = [5.0, 1.0, 9.0, 3.0, 0.5]
FIRST_STAGE_ORDER = [2, 0, 3, 1, 4]


def _docs(scored: bool = True) -> list[Document]:
    return [
        Document(text=t, id=f"d{i}", first_stage_score=FIRST_STAGE[i] if scored else None)
        for i, t in enumerate(documents(len(FIRST_STAGE)))
    ]


def _json_docs(scored: bool = True) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for d in _docs(scored):
        entry: dict[str, Any] = {"text": d.text, "id": d.id}
        if d.first_stage_score is not None:
            entry["first_stage_score"] = d.first_stage_score
        out.append(entry)
    return out


def _post(
    port: int, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read())


def _fallbacks(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r'reranker_fallback_total\{reason="(\w+)"\} (\S+)', text)}


def _assert_grpc_fallback(result: Any, reason: str, order: list[int]) -> None:
    assert [h.index for h in result.hits] == order
    assert all(h.status is HitStatus.FALLBACK and h.fallback_reason == reason for h in result.hits)
    ranking = [h.ranking_score for h in result.hits]
    assert ranking == sorted(ranking, reverse=True) and len(set(ranking)) == len(ranking)


def _assert_http_fallback(port: int, reason: str, body: dict[str, Any], headers: dict[str, str]) -> None:
    """Every HTTP shape: 200, first-stage order, the reason in each entry and in the headers; the
    ml-commons shapes stay what OpenSearch parses (a list of {index, relevance_score}; scores in input
    order whose descending sort is the first-stage order)."""
    status, h, cohere = _post(port, "/v1/rerank", {**body, "fail_open": True}, headers)
    assert status == 200, cohere
    assert h["x-rerank-fallback-reason"] == reason and h["x-rerank-fallback"] == str(len(FIRST_STAGE))
    assert [r["index"] for r in cohere["results"]] == FIRST_STAGE_ORDER
    assert {r["fallback_reason"] for r in cohere["results"]} == {reason}

    status, h, listed = _post(port, "/v1/opensearch/rerank", {**body, "fail_open": True}, headers)
    assert status == 200 and h["x-rerank-fallback-reason"] == reason
    assert all(isinstance(r["index"], int) and isinstance(r["relevance_score"], float) for r in listed)
    assert [r["index"] for r in sorted(listed, key=lambda r: -r["relevance_score"])] == FIRST_STAGE_ORDER

    status, h, scores = _post(port, "/v1/opensearch/scores", {**body, "fail_open": True}, headers)
    assert status == 200 and h["x-rerank-fallback-reason"] == reason
    values = scores["scores"]
    assert len(values) == len(FIRST_STAGE) and all(isinstance(s, float) for s in values)
    assert sorted(range(len(values)), key=lambda i: -values[i]) == FIRST_STAGE_ORDER


def test_overloaded(server_factory, bert_scorer: Scorer) -> None:
    gate = threading.Event()
    rec = RecordingScorer(bert_scorer, gate)
    srv = server_factory(
        test_settings(max_queue_pairs=20, max_documents=20, max_wait_ms=0, warmup=False), scorer=rec
    )
    port = srv.server.http_port
    filler = [pb.Document(text=t) for t in documents(18)]
    with (
        grpc.insecure_channel(srv.target) as ch,
        RerankerClient(srv.target) as client,
        ThreadPoolExecutor(2) as pool,
    ):
        stub = pb_grpc.RerankerServiceStub(ch)
        held = pool.submit(stub.Rerank, pb.RerankRequest(query="a", documents=filler), timeout=60)
        assert rec.entered.wait(10)
        queued = pool.submit(stub.Rerank, pb.RerankRequest(query="b", documents=filler), timeout=60)
        time.sleep(0.3)  # 18 of 20 queue places taken: 5 more documents do not fit
        try:
            with pytest.raises(grpc.RpcError) as err:
                client.rerank("c", _docs())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.RpcError) as err:
                client.rerank("c", _docs(), fail_open=False)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            _assert_grpc_fallback(
                client.rerank("c", _docs(), fail_open=True), "overloaded", FIRST_STAGE_ORDER
            )
            # No first-stage scores: input order. top_n applies.
            _assert_grpc_fallback(
                client.rerank("c", _docs(scored=False), fail_open=True), "overloaded", [0, 1, 2, 3, 4]
            )
            assert [h.index for h in client.rerank("c", _docs(), top_n=2, fail_open=True).hits] == [2, 0]

            body = {"query": "c", "documents": _json_docs()}
            status, headers, error = _post(port, "/v1/rerank", body)
            assert status == 429 and "x-rerank-fallback-reason" not in headers, error
            _assert_http_fallback(port, "overloaded", body, {})
            # Bad input is refused whatever fail_open says.
            status, _, error = _post(
                port, "/v1/rerank", {"query": " ", "documents": ["x"], "fail_open": True}
            )
            assert status == 400, error
            status, _, error = _post(port, "/v1/rerank", {**body, "fail_open": "yes"})
            assert status == 422 and "fail_open" in error["error"]["message"]
            assert _fallbacks(port) == {"overloaded": 6.0}
        finally:
            gate.set()
        assert len(held.result(30).results) == 18 and len(queued.result(30).results) == 18
        # Once it can score again, an opted-in request is reranked as usual.
        assert all(h.status is HitStatus.RERANKED for h in client.rerank("c", _docs(), fail_open=True).hits)


def test_model_error(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(test_settings(max_wait_ms=0), scorer=FailingScorer(bert_scorer, poison="boom"))
    port = srv.server.http_port
    with RerankerClient(srv.target) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.rerank("boom", _docs())
        assert err.value.code() == grpc.StatusCode.INTERNAL
        _assert_grpc_fallback(
            client.rerank("boom", _docs(), fail_open=True), "model_error", FIRST_STAGE_ORDER
        )
    body = {"query": "boom", "documents": _json_docs()}
    status, headers, error = _post(port, "/v1/rerank", body)
    assert status == 500 and "x-rerank-fallback-reason" not in headers, error
    _assert_http_fallback(port, "model_error", body, {})
    assert _fallbacks(port) == {"model_error": 4.0}


def test_unavailable_while_loading_and_draining_and_the_server_default(
    server_factory, bert_scorer: Scorer
) -> None:
    gate = threading.Event()  # holds the warm-up batch: the server listens but is still loading
    rec = RecordingScorer(bert_scorer, gate)
    srv = server_factory(test_settings(fail_open=True), scorer=rec, wait_loaded=False)
    port = srv.server.http_port
    assert rec.entered.wait(10)
    try:
        with RerankerClient(srv.target) as client:
            # The server default (fail_open on) applies when the request says nothing ...
            _assert_grpc_fallback(client.rerank("q", _docs()), "unavailable", FIRST_STAGE_ORDER)
            # ... and a request that says no gets today's error.
            with pytest.raises(grpc.RpcError) as err:
                client.rerank("q", _docs(), fail_open=False)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        body = {"query": "q", "documents": _json_docs()}
        status, headers, error = _post(port, "/v1/rerank", {**body, "fail_open": False})
        assert status == 503 and "x-rerank-fallback-reason" not in headers, error
        status, headers, _ = _post(port, "/v1/rerank", body)  # the server default
        assert status == 200 and headers["x-rerank-fallback-reason"] == "unavailable"
        _assert_http_fallback(port, "unavailable", body, {})
        assert _fallbacks(port) == {"unavailable": 5.0}
    finally:
        gate.set()
    srv.call(srv._await_loaded())
    with RerankerClient(srv.target) as client:
        assert all(h.status is HitStatus.RERANKED for h in client.rerank("q", _docs()).hits)
        srv.loop.call_soon_threadsafe(srv.server.service.begin_drain)
        time.sleep(0.1)
        _assert_grpc_fallback(client.rerank("q", _docs()), "unavailable", FIRST_STAGE_ORDER)
    assert _fallbacks(port) == {"unavailable": 6.0}


def test_deadline(server_factory, bert_scorer: Scorer) -> None:
    gate = threading.Event()
    rec = RecordingScorer(bert_scorer, gate)
    # The server's deadline (a gRPC request without one): 0.5 s.
    srv = server_factory(test_settings(warmup=False, max_wait_ms=0, default_timeout_s=0.5), scorer=rec)
    port = srv.server.http_port
    with (
        grpc.insecure_channel(srv.target) as ch,
        RerankerClient(srv.target) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        stub = pb_grpc.RerankerServiceStub(ch)
        held = pool.submit(stub.Rerank, pb.RerankRequest(query="a", documents=[pb.Document(text="x")]))
        assert rec.entered.wait(10)
        try:
            with pytest.raises(grpc.RpcError) as err:
                client.rerank("q", _docs(), timeout=None)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            result = client.rerank("q", _docs(), timeout=None, fail_open=True)
            _assert_grpc_fallback(result, "deadline", FIRST_STAGE_ORDER)

            body = {"query": "q", "documents": _json_docs()}
            timeout = {"x-rerank-timeout-ms": "200"}
            status, headers, error = _post(port, "/v1/rerank", body, timeout)
            assert status == 504 and "x-rerank-fallback-reason" not in headers, error
            _assert_http_fallback(port, "deadline", body, timeout)
            assert _fallbacks(port) == {"deadline": 4.0}
        finally:
            gate.set()
        with pytest.raises(grpc.RpcError):  # the held request outlived its own 0.5 s deadline
            held.result(30)
    # No pair of a request that fell back on its deadline reached the model.
    assert {p.query for p in rec.seen} == {"a"}


def test_requests_still_running_when_the_drain_ends_fall_back(bert_scorer: Scorer) -> None:
    gate = threading.Event()  # the model never finishes during the drain
    rec = RecordingScorer(bert_scorer, gate)
    srv = ServerThread(test_settings(warmup=False, max_wait_ms=0), scorer=rec)
    port = srv.server.http_port
    body = {"query": "q", "documents": _json_docs(), "fail_open": True}
    try:
        with RerankerClient(srv.target) as client, ThreadPoolExecutor(3) as pool:
            in_model = pool.submit(_post, port, "/v1/opensearch/rerank", body)
            assert rec.entered.wait(10)
            queued_http = pool.submit(_post, port, "/v1/rerank", body)
            queued_grpc = pool.submit(lambda: client.rerank("q", _docs(), timeout=60, fail_open=True))
            while srv.server.service.in_flight < 3:
                time.sleep(0.01)
            metrics_before = _fallbacks(port)
            srv.call(srv.server.stop(1.0))
            status, headers, listed = in_model.result(10)
            assert status == 200 and headers["x-rerank-fallback-reason"] == "unavailable"
            assert [
                r["index"] for r in sorted(listed, key=lambda r: -r["relevance_score"])
            ] == FIRST_STAGE_ORDER
            status, headers, cohere = queued_http.result(10)
            assert status == 200 and [r["index"] for r in cohere["results"]] == FIRST_STAGE_ORDER
            _assert_grpc_fallback(queued_grpc.result(10), "unavailable", FIRST_STAGE_ORDER)
        assert metrics_before == {}
        assert (
            srv.server.metrics.registry.get_sample_value("reranker_fallback_total", {"reason": "unavailable"})
            == 3.0
        )
    finally:
        gate.set()
        srv.loop.call_soon_threadsafe(srv.loop.stop)
