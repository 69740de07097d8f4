"""The gRPC server end to end: real server on ephemeral ports, real grpc clients."""

from __future__ import annotations

import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar._proto.reranker.v1 import reranker_pb2_grpc as pb_grpc
from sidecar.client import RerankerClient
from sidecar.scoring.base import Pair, Scorer
from sidecar.settings import SERVICE_NAME
from sidecar.types import Document
from tests.conftest import test_settings
from tests.fakes import RecordingScorer
from tests.texts import documents, queries


def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def _stub(target: str) -> tuple[grpc.Channel, pb_grpc.RerankerServiceStub]:
    ch = grpc.insecure_channel(target)
    return ch, pb_grpc.RerankerServiceStub(ch)


def test_rerank_returns_ranked_results(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(scorer=bert_scorer)
    docs = [Document(text=t, id=f"d{i}", first_stage_score=10.0 - i) for i, t in enumerate(documents(10))]
    with RerankerClient(srv.target) as client:
        result = client.rerank(queries(1)[0], docs, top_n=5)
    assert len(result.hits) == 5
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True)
    expected = bert_scorer.score([Pair(queries(1)[0], d.text) for d in docs])
    assert [h.index for h in result.hits] == list(np.argsort(-expected, kind="stable")[:5])
    for h in result.hits:
        assert h.id == f"d{h.index}" and h.first_stage_score == 10.0 - h.index
        assert abs(h.score - expected[h.index]) < 1e-5
    assert result.model_id == bert_scorer.info.model_id and result.model_revision.startswith("sha256:")
    assert (
        result.timings.inference_seconds > 0
        and result.timings.total_seconds >= result.timings.inference_seconds
    )
    assert result.timings.batches >= 1


def test_health_reflection_and_info(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(scorer=bert_scorer)
    assert _health(srv.target) == health_pb2.HealthCheckResponse.SERVING
    assert _health(srv.target, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(srv.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    with RerankerClient(srv.target) as client:
        info = client.info()
    assert info.backend == "cross-encoder" and info.model_id == bert_scorer.info.model_id
    assert info.max_length == 64 and info.dtype == "float32" and info.device == "cpu"
    assert info.max_documents == srv.server.settings.max_documents


def test_not_serving_until_model_warmed_up(server_factory, bert_scorer: Scorer) -> None:
    gate = threading.Event()
    srv = server_factory(scorer=RecordingScorer(bert_scorer, gate), wait_loaded=False)
    assert _health(srv.target) == health_pb2.HealthCheckResponse.NOT_SERVING
    ch, stub = _stub(srv.target)
    with pytest.raises(grpc.RpcError) as err:
        stub.Rerank(pb.RerankRequest(query="q", documents=[pb.Document(text="d")]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    gate.set()
    deadline = time.monotonic() + 30
    while _health(srv.target) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stub.Rerank(pb.RerankRequest(query="q", documents=[pb.Document(text="d")]), timeout=5).results
    ch.close()


BAD_REQUESTS = [
    (pb.RerankRequest(query="", documents=[pb.Document(text="d")]), "query is empty"),
    (pb.RerankRequest(query="   ", documents=[pb.Document(text="d")]), "query is empty"),
    (pb.RerankRequest(query="q"), "no documents"),
    (pb.RerankRequest(query="q", documents=[pb.Document(text="d")] * 6), "limit of 5"),
    (
        pb.RerankRequest(query="q", documents=[pb.Document(text="d")], instruction="Judge relevance"),
        "takes no instruction",
    ),
    (
        pb.RerankRequest(query="q", documents=[pb.Document(text="d", first_stage_score=float("nan"))]),
        "not a finite number",
    ),
]


def test_bad_input_is_invalid_argument_and_server_stays_serving(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(test_settings(max_documents=5), scorer=bert_scorer)
    ch, stub = _stub(srv.target)
    for request, message in BAD_REQUESTS:
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in err.value.details()
    assert _health(srv.target) == health_pb2.HealthCheckResponse.SERVING
    assert (
        len(
            stub.Rerank(pb.RerankRequest(query="q", documents=[pb.Document(text="d")] * 5), timeout=5).results
        )
        == 5
    )
    ch.close()


def test_long_documents_are_truncated_and_reported(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(scorer=bert_scorer)
    with RerankerClient(srv.target) as client:
        result = client.rerank("q", ["short", "protein folding " * 300])
    assert {h.index: h.truncated for h in result.hits} == {0: False, 1: True}


def test_overload_is_resource_exhausted(server_factory, bert_scorer: Scorer) -> None:
    gate = threading.Event()
    rec = RecordingScorer(bert_scorer, gate)
    srv = server_factory(
        test_settings(max_queue_pairs=20, max_documents=20, max_wait_ms=0, warmup=False), scorer=rec
    )
    ch, stub = _stub(srv.target)
    docs = [pb.Document(text=t) for t in documents(15)]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(stub.Rerank, pb.RerankRequest(query="a", documents=docs), timeout=30)
        assert rec.entered.wait(10)
        second = pool.submit(stub.Rerank, pb.RerankRequest(query="b", documents=docs), timeout=30)
        time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(pb.RerankRequest(query="c", documents=docs), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in err.value.details()
        gate.set()
        assert len(first.result().results) == 15 and len(second.result().results) == 15
    ch.close()


def test_deadline_exceeded_work_never_reaches_model(server_factory, bert_scorer: Scorer) -> None:
    gate = threading.Event()
    rec = RecordingScorer(bert_scorer, gate)
    srv = server_factory(test_settings(max_wait_ms=0, warmup=False), scorer=rec)
    ch, stub = _stub(srv.target)
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(
            stub.Rerank, pb.RerankRequest(query="blocker", documents=[pb.Document(text="x")]), timeout=30
        )
        assert rec.entered.wait(10)
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(pb.RerankRequest(query="late", documents=[pb.Document(text="y")] * 4), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.set()
        blocker.result()
    time.sleep(0.2)
    assert "late" not in {p.query for p in rec.seen}
    ch.close()


def test_concurrent_clients_share_batches_with_solo_scores(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(test_settings(max_wait_ms=20), scorer=bert_scorer)
    qs = queries(3) + [f"variant query {i}" for i in range(5)]
    docs = documents(24)
    with RerankerClient(srv.target) as client, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda q: client.rerank(q, docs), qs))
    shared = [jobs for _, jobs in srv.server.service.batcher.batch_log if jobs > 1]
    assert shared, "no batch held pairs from more than one request"
    for q, result in zip(qs, results, strict=True):
        alone = bert_scorer.score([Pair(q, d) for d in docs])
        got = np.empty(len(docs))
        for h in result.hits:
            got[h.index] = h.score
        np.testing.assert_allclose(got, alone, atol=1e-5)


def _scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics as {name{labels}: value} (the exposition format parsed, not grepped)."""
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def test_metrics_by_stage_count_real_traffic(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(scorer=bert_scorer)
    port = srv.server.metrics_port
    before = _scrape(port)  # after the warm-up batch: the deltas below are this test's traffic alone
    with RerankerClient(srv.target) as client:
        client.rerank("q", documents(4))
        client.rerank("another q", documents(3))
        with pytest.raises(grpc.RpcError):
            client.rerank("", documents(1))
    after = _scrape(port)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('reranker_requests_total{api="grpc",outcome="ok"}') == 2
    assert delta('reranker_requests_total{api="grpc",outcome="invalid_argument"}') == 1
    assert delta("reranker_pairs_scored_total") == 7  # the refused request reached no model
    assert delta("reranker_batch_pairs_sum") == 7
    assert delta("reranker_batch_pairs_count") == delta("reranker_inference_seconds_count") >= 1
    assert delta("reranker_inference_seconds_sum") > 0
    assert delta("reranker_batch_tokens_sum") >= delta("reranker_batch_real_tokens_sum") > 7
    assert delta("reranker_queue_seconds_count") >= 2
    assert delta("reranker_tokenize_seconds_count") >= 2
    assert after["reranker_queue_pairs"] == 0  # nothing left waiting
    assert after["reranker_ready"] == 1.0
