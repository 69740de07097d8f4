"""The drain keeps its word (every accepted request gets an answer or a clear status, and stop takes
the drain plus about a second, open Health.Watch streams or not); HTTP clients that give up have their
pairs dropped, as gRPC's are."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar._proto.reranker.v1 import reranker_pb2_grpc as pb_grpc
from sidecar.scoring.base import Scorer
from tests.conftest import ServerThread, test_settings
from tests.fakes import RecordingScorer
from tests.texts import documents


def _post(port: int, body: dict, timeout: float = 60) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/rerank", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_requests_still_running_when_the_drain_ends_get_a_clear_status(bert_scorer: Scorer) -> None:
    gate = threading.Event()  # the model never finishes during the drain
    rec = RecordingScorer(bert_scorer, gate)
    srv = ServerThread(test_settings(warmup=False, max_wait_ms=0), scorer=rec)
    port = srv.server.http_port
    try:
        with grpc.insecure_channel(srv.target) as ch, ThreadPoolExecutor(4) as pool:
            stub = pb_grpc.RerankerServiceStub(ch)
            in_model = pool.submit(_post, port, {"query": "in the model", "documents": ["a", "b"]})
            assert rec.entered.wait(10)
            queued_http = pool.submit(_post, port, {"query": "queued", "documents": documents(5)})
            queued_grpc = pool.submit(
                stub.Rerank, pb.RerankRequest(query="q", documents=[pb.Document(text="d")]), timeout=60
            )
            while srv.server.service.in_flight < 3:
                time.sleep(0.01)
            t0 = time.monotonic()
            srv.call(srv.server.stop(1.0))
            took = time.monotonic() - t0
            for fut in (in_model, queued_http):
                status, body = fut.result(10)
                assert status == 503 and body["error"]["code"] == "unavailable"
                assert "shut down before this request finished" in body["error"]["message"]
            try:
                queued_grpc.result(10)
                raise AssertionError("the queued gRPC call was answered after the drain")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert took < 1.0 + 3.0, f"stop took {took:.1f}s for a 1 s drain"
    finally:
        gate.set()
        srv.loop.call_soon_threadsafe(srv.loop.stop)


def test_an_open_health_watch_does_not_hold_the_shutdown(bert_scorer: Scorer) -> None:
    srv = ServerThread(test_settings(), scorer=bert_scorer)
    with grpc.insecure_channel(srv.target) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        t0 = time.monotonic()
        srv.call(srv.server.stop(10.0))  # nothing in flight: no reason to wait the 10 s
        took = time.monotonic() - t0
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    srv.loop.call_soon_threadsafe(srv.loop.stop)
    assert took < 5.0, f"an idle server took {took:.1f}s to stop with a Watch stream open (drain 10 s)"


def test_an_http_client_that_gives_up_has_its_pairs_dropped(server_factory, bert_scorer: Scorer) -> None:
    gate = threading.Event()
    rec = RecordingScorer(bert_scorer, gate)
    srv = server_factory(test_settings(warmup=False, max_wait_ms=0), scorer=rec)
    port = srv.server.http_port
    with ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(_post, port, {"query": "blocker", "documents": ["x"]})
        assert rec.entered.wait(10)
        body = json.dumps({"query": "abandoned", "documents": documents(24)}).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            while srv.server.service.batcher is None or srv.server.service.batcher.queued_pairs < 24:
                time.sleep(0.01)
        # The client is gone: its 24 queued pairs must leave the queue before the model frees up.
        deadline = time.monotonic() + 10
        while srv.server.service.batcher.queued_pairs:
            assert time.monotonic() < deadline, "the abandoned request's pairs are still queued"
            time.sleep(0.02)
        gate.set()
        assert blocker.result(30)[0] == 200
    assert "abandoned" not in {p.query for p in rec.seen}
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'reranker_requests_total{api="http",outcome="cancelled"} 1.0' in metrics
    assert 'reranker_pairs_dropped_total{reason="cancelled"} 24.0' in metrics
