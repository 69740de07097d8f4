"""The HTTP/JSON front end on a real in-process server: shapes, parity with gRPC, shared batches, and
every kind of bad input mapped through the error table (400/413/422/429/503/504, never 500)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sidecar.client import RerankerClient
from sidecar.opensearch import mlcommons
from sidecar.scoring.base import Pair, Scorer
from sidecar.types import Document
from tests.fakes import RecordingScorer
from tests.opensearch.conftest import HttpServer, http_request, post_json
from tests.texts import documents, queries

QUERY = queries(1)[0]
DOCS = documents(8)


def _error(reply, status: int) -> dict:
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers["content-type"].startswith("application/json")
    err = reply.json()["error"]
    assert err["status"] == status and err["message"] and err["code"]
    return err


# ---- shapes -----------------------------------------------------------------------------------
def test_three_shapes_carry_the_same_scores(sidecar_http: HttpServer, bert_scorer: Scorer) -> None:
    expected = bert_scorer.score([Pair(QUERY, d) for d in DOCS])
    body = {"query": QUERY, "documents": DOCS, "top_n": len(DOCS)}

    cohere = post_json(sidecar_http.url, mlcommons.PATH_COHERE, body)
    assert cohere.status == 200 and cohere.headers["x-rerank-model"] == bert_scorer.info.model_id
    results = cohere.json()["results"]
    as_list = post_json(sidecar_http.url, mlcommons.PATH_LIST, body).json()
    scores = post_json(sidecar_http.url, mlcommons.PATH_SCORES, body).json()["scores"]

    assert [r["index"] for r in results] == [r["index"] for r in as_list]
    assert [r["relevance_score"] for r in results] == sorted(scores, reverse=True)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
    for r in results:
        assert r["relevance_score"] == scores[r["index"]]
        assert isinstance(r["relevance_score"], float)


def test_cohere_top_n_and_return_documents(sidecar_http: HttpServer) -> None:
    objs = [{"text": d, "id": f"d{i}"} for i, d in enumerate(DOCS)]
    reply = post_json(
        sidecar_http.url,
        "/v2/rerank",
        {"model": "ignored", "query": QUERY, "documents": objs, "top_n": 3, "return_documents": True},
    )
    results = reply.json()["results"]
    assert len(results) == 3
    for r in results:
        assert r["document"]["text"] == DOCS[r["index"]]
    # More than there are means all (Cohere), and the scores endpoint ignores top_n.
    assert len(
        post_json(sidecar_http.url, "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 99}).json()[
            "results"
        ]
    ) == len(DOCS)
    assert len(
        post_json(
            sidecar_http.url, mlcommons.PATH_SCORES, {"query": QUERY, "documents": DOCS, "top_n": 2}
        ).json()["scores"]
    ) == len(DOCS)


def test_titles_and_multi_valued_documents(sidecar_http: HttpServer) -> None:
    # {"title", "text"} reads as "title text", like gRPC; a list of strings (a multi-valued field sent by
    # ml_inference) reads as its values joined by a space.
    a = post_json(
        sidecar_http.url,
        mlcommons.PATH_SCORES,
        {
            "query": QUERY,
            "documents": [{"title": "Vaccines", "text": "train immunity"}, ["Vaccines", "train immunity"]],
        },
    ).json()["scores"]
    b = post_json(
        sidecar_http.url,
        mlcommons.PATH_SCORES,
        {"query": QUERY, "documents": ["Vaccines train immunity"] * 2},
    ).json()["scores"]
    assert a == b


def test_http_and_grpc_give_identical_scores(sidecar_http: HttpServer) -> None:
    docs = [Document(text=d, id=f"d{i}", title=("Title" if i % 2 else None)) for i, d in enumerate(DOCS)]
    with RerankerClient(sidecar_http.target) as client:
        grpc_result = client.rerank(QUERY, docs)
    body = {"query": QUERY, "documents": [{"text": d.text, "id": d.id, "title": d.title} for d in docs]}
    http_results = post_json(sidecar_http.url, "/v1/rerank", body).json()["results"]
    assert [r["index"] for r in http_results] == [h.index for h in grpc_result.hits]
    for r, h in zip(http_results, grpc_result.hits, strict=True):
        # Scores are float32 from the model: identical at that precision (JSON keeps <= 18 characters).
        assert np.float32(r["relevance_score"]) == np.float32(h.score)
        assert abs(r["relevance_score"] - h.score) <= 1e-12 * max(1.0, abs(h.score))


def test_http_and_grpc_requests_share_batches(bert_scorer: Scorer) -> None:
    gate = threading.Event()
    rec = RecordingScorer(bert_scorer, gate=gate)
    srv = HttpServer(rec, warmup=False, max_wait_ms=50.0)
    try:
        with ThreadPoolExecutor(3) as pool:
            # The first request occupies the model; the next two queue together behind it.
            first = pool.submit(post_json, srv.url, "/v1/rerank", {"query": "first", "documents": ["a"]})
            assert rec.entered.wait(30)
            via_http = pool.submit(
                post_json, srv.url, "/v1/rerank", {"query": "from http", "documents": DOCS[:2]}
            )
            with RerankerClient(srv.target) as client:
                via_grpc = pool.submit(client.rerank, "from grpc", DOCS[:2])
                time.sleep(0.3)
                gate.set()
                assert first.result(30).status == 200 and via_http.result(30).status == 200
                assert len(via_grpc.result(30).hits) == 2
        mixed = [b for b in rec.batches if {p.query for p in b} >= {"from http", "from grpc"}]
        assert mixed, [[p.query for p in b] for b in rec.batches]
    finally:
        gate.set()
        srv.stop()


# ---- health, metrics, info --------------------------------------------------------------------
def test_health_metrics_and_info(sidecar_http: HttpServer) -> None:
    for path in ("/health", "/healthz"):
        reply = http_request(sidecar_http.url, "GET", path)
        assert reply.status == 200 and reply.json() == {"status": "SERVING"}
    info = http_request(sidecar_http.url, "GET", "/v1/info").json()
    assert info["ready"] is True and info["max_body_bytes"] > 0 and info["model_id"]
    post_json(sidecar_http.url, "/v1/rerank", {"query": QUERY, "documents": DOCS[:2]})
    http_request(sidecar_http.url, "POST", "/v1/rerank", b"{not json")
    metrics = http_request(sidecar_http.url, "GET", "/metrics")
    assert metrics.status == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.body.decode()
    assert 'reranker_requests_total{api="http",outcome="ok"}' in text
    # Refused before the service, still counted.
    assert 'reranker_requests_total{api="http",outcome="invalid_argument"}' in text


def test_not_ready_is_503_until_warmed_up(bert_scorer: Scorer) -> None:
    from tests.conftest import ServerThread, test_settings

    gate = threading.Event()
    rec = RecordingScorer(bert_scorer, gate=gate)
    thread = ServerThread(test_settings(warmup=True), rec, wait_loaded=False)
    url = f"http://127.0.0.1:{thread.server.http_port}"
    try:
        assert rec.entered.wait(30)  # the warm-up batch is held in the model
        assert http_request(url, "GET", "/health").status == 503
        _error(post_json(url, "/v1/opensearch/rerank", {"query": "q", "documents": ["d"]}), 503)
        gate.set()
        deadline = time.monotonic() + 30
        while http_request(url, "GET", "/health").status != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert post_json(url, "/v1/opensearch/rerank", {"query": "q", "documents": ["d"]}).status == 200
    finally:
        gate.set()
        thread.stop(grace=1.0)


# ---- overload and deadlines -------------------------------------------------------------------
def test_overload_is_429(bert_scorer: Scorer) -> None:
    gate = threading.Event()
    rec = RecordingScorer(bert_scorer, gate)
    # max_documents may not exceed max_queue_pairs (a request the queue could never hold is refused at
    # start-up), so overload means a queue busy with other requests.
    srv = HttpServer(rec, max_queue_pairs=4, max_documents=4, warmup=False, max_wait_ms=0)
    body = {"query": QUERY, "documents": DOCS[:4]}
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post_json, srv.url, "/v1/rerank", body)
            assert rec.entered.wait(10)  # its pairs left the queue for the model
            second = pool.submit(post_json, srv.url, "/v1/rerank", body)
            while srv.server.service.batcher is None or srv.server.service.batcher.queued_pairs < 4:
                time.sleep(0.01)
            err = _error(post_json(srv.url, "/v1/rerank", {"query": QUERY, "documents": DOCS[:1]}), 429)
            assert err["code"] == "overloaded"
            gate.set()
            assert first.result(30).status == 200 and second.result(30).status == 200
    finally:
        gate.set()
        srv.stop()


def test_timeout_header_sets_the_deadline(bert_scorer: Scorer) -> None:
    gate = threading.Event()
    rec = RecordingScorer(bert_scorer, gate=gate)
    srv = HttpServer(rec, warmup=False)
    try:
        with ThreadPoolExecutor(2) as pool:
            blocker = pool.submit(post_json, srv.url, "/v1/rerank", {"query": "hold", "documents": ["a"]})
            assert rec.entered.wait(30)
            reply = post_json(
                srv.url,
                mlcommons.PATH_LIST,
                {"query": QUERY, "documents": DOCS[:2]},
                headers={mlcommons.TIMEOUT_HEADER: "100"},
            )
            gate.set()
            assert blocker.result(30).status == 200
        assert _error(reply, 504)["code"] == "deadline_exceeded"
        for bad in ("0", "-5", "soon", "nan", "inf"):
            r = post_json(
                srv.url,
                "/v1/rerank",
                {"query": QUERY, "documents": ["a"]},
                headers={mlcommons.TIMEOUT_HEADER: bad},
            )
            _error(r, 400)
    finally:
        gate.set()
        srv.stop()


# ---- bad input --------------------------------------------------------------------------------
MALFORMED = [
    (b"{not json", 400),
    (b'{"query": "q", "documents": ["a"]', 400),
    (b"", 400),
    (b"   ", 400),
    (b'{"query": "q", "documents": [NaN]}', 400),
    (b'{"query": "q", "documents": ["a"], "top_n": Infinity}', 400),
    (b"\xff\xfe{}", 400),
    ('{"query": "caf\u00e9", "documents": ["a"]}'.encode("latin-1"), 400),
    (b"[" * 100000 + b"]" * 100000, 400),
]

WRONG_SCHEMA = [
    [],
    "just a string",
    {"documents": ["a"]},
    {"query": "q"},
    {"query": 5, "documents": ["a"]},
    {"query": None, "documents": ["a"]},
    {"query": "q", "documents": "a"},
    {"query": "q", "documents": {"text": "a"}},
    {"query": "q", "documents": [1]},
    {"query": "q", "documents": [None]},
    {"query": "q", "documents": [{"title": "no text"}]},
    {"query": "q", "documents": [{"text": 3}]},
    {"query": "q", "documents": [{"text": "a", "title": 3}]},
    {"query": "q", "documents": [{"text": "a", "id": [1]}]},
    {"query": "q", "documents": [["a", 1]]},
    {"query": "q", "documents": ["a"], "top_n": "2"},
    {"query": "q", "documents": ["a"], "top_n": -1},
    {"query": "q", "documents": ["a"], "top_n": True},
    {"query": "q", "documents": ["a"], "top_n": 1.5},
    {"query": "q", "documents": ["a"], "instruction": 7},
    {"query": "q", "documents": ["a"], "return_documents": "yes"},
]

REFUSED_BY_SERVICE = [
    {"query": "", "documents": ["a"]},
    {"query": "   ", "documents": ["a"]},
    {"query": "q", "documents": []},
    {"query": "x" * 20000, "documents": ["a"]},
    {"query": "q", "documents": ["a"] * 1001},
]


@pytest.mark.parametrize("path", [mlcommons.PATH_COHERE, mlcommons.PATH_LIST, mlcommons.PATH_SCORES])
def test_malformed_bodies_are_400(sidecar_http: HttpServer, path: str) -> None:
    for body, status in MALFORMED:
        assert (
            _error(http_request(sidecar_http.url, "POST", path, body), status)["code"] == "invalid_argument"
        )


@pytest.mark.parametrize("path", [mlcommons.PATH_COHERE, mlcommons.PATH_LIST, mlcommons.PATH_SCORES])
def test_wrong_fields_and_types_are_422(sidecar_http: HttpServer, path: str) -> None:
    for obj in WRONG_SCHEMA:
        err = _error(post_json(sidecar_http.url, path, obj), 422)
        assert err["code"] == "invalid_argument", obj


def test_semantic_limits_are_400(sidecar_http: HttpServer) -> None:
    for obj in REFUSED_BY_SERVICE:
        _error(post_json(sidecar_http.url, "/v1/rerank", obj), 400)


def test_bodies_over_the_limit_are_413(sidecar_http: HttpServer) -> None:
    limit = http_request(sidecar_http.url, "GET", "/v1/info").json()["max_body_bytes"]
    big = json.dumps({"query": "q", "documents": ["x" * (limit + 10)]}).encode()
    err = _error(http_request(sidecar_http.url, "POST", "/v1/rerank", big), 413)
    assert err["code"] == "payload_too_large" and str(limit) in err["message"]
    # Chunked bodies carry no Content-Length: the limit applies while reading.
    _error(http_request(sidecar_http.url, "POST", "/v1/opensearch/rerank", big, chunked=True), 413)
    # A body just under the limit is fine as far as size goes.
    ok = json.dumps({"query": "q", "documents": ["x" * 1000]}).encode()
    assert http_request(sidecar_http.url, "POST", "/v1/rerank", ok, chunked=True).status == 200


def test_routing_errors_are_json(sidecar_http: HttpServer) -> None:
    _error(http_request(sidecar_http.url, "GET", "/v1/nope"), 404)
    reply = http_request(sidecar_http.url, "GET", "/v1/rerank")
    _error(reply, 405)
    assert "POST" in reply.headers.get("allow", "")


def test_no_client_mistake_is_a_500(sidecar_http: HttpServer) -> None:
    rng = np.random.default_rng(0)
    bodies = [bytes(rng.integers(0, 256, size=n, dtype=np.uint8)) for n in (1, 7, 64, 1000)]
    bodies += [json.dumps(v).encode() for v in (0, 1.5, True, None, {"query": {"a": 1}, "documents": [{}]})]
    bodies += [
        b'{"query": "q", "documents": ["a"], "top_n": 1e400}',
        b'{"query": "\\ud800", "documents": ["a"]}',
    ]
    for body in bodies:
        reply = http_request(sidecar_http.url, "POST", "/v1/opensearch/scores", body)
        assert reply.status in (200, 400, 413, 422), (body[:40], reply.status, reply.body[:200])
