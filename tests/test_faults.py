"""Faults inside the server, seen from real clients: a failing batch, a dead batcher loop, malformed
and oversized gRPC messages."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar._proto.reranker.v1 import reranker_pb2_grpc as pb_grpc
from sidecar.scoring.base import Scorer
from tests.conftest import test_settings
from tests.fakes import FailingScorer, RecordingScorer, break_batcher_loop
from tests.texts import documents

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _request(query: str, n: int) -> pb.RerankRequest:
    return pb.RerankRequest(query=query, documents=[pb.Document(text=t) for t in documents(n)])


def _health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_a_failed_request_does_not_shrink_the_queue(server_factory, bert_scorer: Scorer) -> None:
    settings = test_settings(max_queue_pairs=100, max_documents=100, max_batch_pairs=10, max_wait_ms=0)
    srv = server_factory(settings, scorer=FailingScorer(bert_scorer, poison="boom"))
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.RerankerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(_request("boom", 50), timeout=30)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert err.value.details() == "internal error; the sidecar logged the details"
        for _ in range(3):  # permanently refused "queue full" before the fix
            assert len(stub.Rerank(_request("fine", 61), timeout=60).results) == 61
        assert _health(ch) == SERVING
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.server.http_port}/metrics", timeout=5).read()
    assert b"reranker_queue_pairs 0.0" in metrics


def test_a_dead_batcher_fails_waiting_requests_and_turns_health_not_serving(
    server_factory, bert_scorer: Scorer
) -> None:
    gate = threading.Event()
    rec = RecordingScorer(bert_scorer, gate)
    srv = server_factory(test_settings(warmup=False, max_wait_ms=0), scorer=rec)
    with grpc.insecure_channel(srv.target) as ch, ThreadPoolExecutor(2) as pool:
        stub = pb_grpc.RerankerServiceStub(ch)
        first = pool.submit(stub.Rerank, _request("first", 1), timeout=60)
        assert rec.entered.wait(10)
        waiting = pool.submit(stub.Rerank, _request("waiting", 5), timeout=60)
        time.sleep(0.2)
        assert srv.server.service.batcher is not None
        srv.call(_break(srv.server.service.batcher))
        gate.set()
        assert len(first.result(30).results) == 1
        with pytest.raises(grpc.RpcError) as err:
            waiting.result(30)  # at once, not after its 60 s deadline
        assert err.value.code() == grpc.StatusCode.INTERNAL
        deadline = time.monotonic() + 10
        while _health(ch) != NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(_request("later", 2), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "restart" in (err.value.details() or "")
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(f"http://127.0.0.1:{srv.server.http_port}/health", timeout=5)
    assert http_err.value.code == 503


async def _break(batcher: object) -> None:
    break_batcher_loop(batcher)


def _raw_rerank(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    # No serializer: the bytes go on the wire as they are.
    return channel.unary_unary(
        "/reranker.v1.RerankerService/Rerank", response_deserializer=pb.RerankResponse.FromString
    )


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x0a\x02\xff\xfe", id="invalid-utf8-query"),
        pytest.param(b"\x0a\xff\xff\xff", id="corrupt-length"),
        pytest.param(
            pb.RerankRequest(query="q", documents=[pb.Document(text="d" * 50)]).SerializeToString()[:-10],
            id="truncated",
        ),
        pytest.param(b"\x12\x05\x0a\x03\xc3\x28\x41", id="invalid-utf8-document"),
    ],
)
def test_malformed_grpc_messages_are_invalid_argument_without_a_traceback(
    server_factory, bert_scorer: Scorer, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    srv = server_factory(scorer=bert_scorer)
    with grpc.insecure_channel(srv.target) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _raw_rerank(ch)(raw, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details() or ""
        assert "not a valid reranker.v1.RerankRequest" in details
        assert "class" not in details and "DecodeError" not in details
        # The server is fine and still answers.
        good = pb.RerankRequest(query="q", documents=[pb.Document(text="d")])
        assert len(pb_grpc.RerankerServiceStub(ch).Rerank(good, timeout=30).results) == 1
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelname == "ERROR"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.server.http_port}/metrics", timeout=5).read()
    assert b'reranker_requests_total{api="grpc",outcome="invalid_argument"} 1.0' in metrics


def test_an_oversized_grpc_message_is_invalid_argument_not_retry_later(
    server_factory, bert_scorer: Scorer
) -> None:
    limit = 64 << 10
    srv = server_factory(test_settings(max_body_bytes=limit), scorer=bert_scorer)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.RerankerServiceStub(ch)
        big = pb.RerankRequest(query="q", documents=[pb.Document(text="x" * (limit + 100))])
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(big, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"exceeds the limit of {limit} bytes" in (err.value.details() or "")
        # Far beyond the limit gRPC refuses before our code sees it (documented in the README).
        huge = pb.RerankRequest(query="q", documents=[pb.Document(text="x" * (3 * limit))])
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(huge, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(
            stub.Rerank(pb.RerankRequest(query="q", documents=[pb.Document(text="d")]), timeout=30).results
        )


def test_top_n_beyond_the_documents_means_all_on_both_front_ends(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(scorer=bert_scorer)
    docs = documents(3)
    with grpc.insecure_channel(srv.target) as ch:
        reply = pb_grpc.RerankerServiceStub(ch).Rerank(
            pb.RerankRequest(query="q", documents=[pb.Document(text=t) for t in docs], top_n=50), timeout=30
        )
    body = json.dumps({"query": "q", "documents": docs, "top_n": 50}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{srv.server.http_port}/v1/rerank",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        http_results = json.loads(resp.read())["results"]
    assert [r.index for r in reply.results] == [r["index"] for r in http_results]
    assert len(reply.results) == 3


def test_a_queue_smaller_than_the_largest_request_is_refused_at_start_up() -> None:
    from pydantic import ValidationError

    from sidecar.settings import Settings

    with pytest.raises(ValidationError, match=r"max_queue_pairs \(500\) is below max_documents \(1000\)"):
        Settings(max_queue_pairs=500)
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--max-queue-pairs", "500"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "invalid setting: max_queue_pairs (500) is below max_documents (1000): a request of max_documents "
        "could never be queued; raise --max-queue-pairs or lower --max-documents"
    ]


def test_a_request_larger_than_the_queue_is_not_retry_later(bert_scorer: Scorer) -> None:
    from sidecar.batcher import Batcher
    from sidecar.errors import InvalidInput, Overloaded, status_of
    from sidecar.metrics import Metrics
    from sidecar.scoring.base import Pair

    async def main() -> None:
        b = Batcher(
            bert_scorer,
            Metrics(),
            max_batch_tokens=2048,
            max_batch_pairs=64,
            max_wait_s=0,
            max_queue_pairs=10,
        )
        b.start()
        with pytest.raises(InvalidInput, match="can never fit the queue of 10") as err:
            await b.submit([Pair("q", "d")] * 11, [4] * 11, asyncio.get_running_loop().time() + 10)
        assert (
            not isinstance(err.value, Overloaded)
            and status_of(err.value).grpc == grpc.StatusCode.INVALID_ARGUMENT
        )
        await b.close()

    asyncio.run(main())


def test_a_malformed_health_check_is_invalid_argument_and_probes_still_work(
    server_factory, bert_scorer: Scorer, caplog: pytest.LogCaptureFixture
) -> None:
    srv = server_factory(scorer=bert_scorer)
    with grpc.insecure_channel(srv.target) as ch:
        raw = ch.unary_unary(
            "/grpc.health.v1.Health/Check", response_deserializer=health_pb2.HealthCheckResponse.FromString
        )
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\x0a\x02\xff\xfe", timeout=10)  # `service` is not UTF-8
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid grpc.health.v1.HealthCheckRequest" in (err.value.details() or "")
        assert _health(ch) == SERVING
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert next(watch).status == SERVING
        watch.cancel()
    assert "Traceback" not in caplog.text
