"""Abusive connections are closed (slow or missing headers, idle keep-alive, trickled bodies, raw TCP on
the gRPC port, idle gRPC channels); POST routes take JSON only; no version banner."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar._proto.reranker.v1 import reranker_pb2_grpc as pb_grpc
from sidecar.scoring.base import Scorer
from tests.conftest import test_settings

TIMEOUT = 0.5


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed the connection within `seconds`, and what it sent before."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return False, received
    except ConnectionResetError:
        pass
    return True, received


@pytest.fixture
def guarded(server_factory, bert_scorer: Scorer):  # type: ignore[no-untyped-def]
    settings = test_settings(
        connection_timeout_s=TIMEOUT, http_body_timeout_s=TIMEOUT, grpc_idle_timeout_s=TIMEOUT
    )
    return server_factory(settings, scorer=bert_scorer)


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="idle"),
        pytest.param(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\n", id="headers-never-finished"),
        pytest.param(b"PO", id="slowloris-first-bytes"),
    ],
)
def test_http_connections_without_a_complete_request_are_closed(guarded, sent: bytes) -> None:
    with socket.create_connection(("127.0.0.1", guarded.server.http_port)) as sock:
        sock.sendall(sent)
        time.sleep(TIMEOUT / 2)
        sock.sendall(b"X-Trickle: 1\r\n" if sent else b"")  # trickling more bytes does not extend it
        closed, _ = _closed_within(sock, 10)
    assert closed


def test_an_idle_keep_alive_connection_is_closed_after_its_answer(guarded) -> None:
    body = json.dumps({"query": "q", "documents": ["d"]}).encode()
    with socket.create_connection(("127.0.0.1", guarded.server.http_port)) as sock:
        sock.sendall(
            b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        closed, received = _closed_within(sock, 10)
    assert closed and received.startswith(b"HTTP/1.1 200")


def test_a_trickled_body_gets_408(guarded) -> None:
    with socket.create_connection(("127.0.0.1", guarded.server.http_port)) as sock:
        sock.sendall(
            b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"query": '
        )
        closed, received = _closed_within(sock, 10)
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b'"code":"request_timeout"' in received and closed


def test_a_raw_tcp_connection_to_the_grpc_port_is_closed(guarded) -> None:
    with socket.create_connection(("127.0.0.1", guarded.server.grpc_port)) as sock:
        closed, _ = _closed_within(sock, 10)
    assert closed


def test_an_idle_grpc_connection_is_closed_and_the_client_reconnects(guarded) -> None:
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(guarded.target) as ch:
        stub = pb_grpc.RerankerServiceStub(ch)
        request = pb.RerankRequest(query="q", documents=[pb.Document(text="d")])
        assert len(stub.Rerank(request, timeout=30).results) == 1
        ch.subscribe(states.append)
        deadline = time.monotonic() + 10
        while grpc.ChannelConnectivity.IDLE not in states[1:]:  # the server closed it (GOAWAY)
            assert time.monotonic() < deadline, states
            time.sleep(0.05)
        assert len(stub.Rerank(request, timeout=30).results) == 1


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_posts_that_are_not_json_are_refused_415(server_factory, bert_scorer: Scorer, content_type) -> None:
    srv = server_factory(scorer=bert_scorer)
    body = json.dumps({"query": "q", "documents": ["d"]}).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(
        f"http://127.0.0.1:{srv.server.http_port}/v1/rerank", data=body, headers=headers
    )
    if content_type is None:
        req.remove_header("Content-type")  # urllib adds a form type by default
        req.unredirected_hdrs.pop("Content-type", None)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 415
    error = json.loads(err.value.read())["error"]
    assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    ok = urllib.request.Request(
        req.full_url, data=body, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    with urllib.request.urlopen(ok, timeout=30) as resp:
        assert resp.status == 200


def test_no_version_banner(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(scorer=bert_scorer)
    base = f"http://127.0.0.1:{srv.server.http_port}"
    with urllib.request.urlopen(base + "/health", timeout=10) as resp:
        ok_server = resp.headers["Server"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/no-such-path", timeout=10)
    for server in (ok_server, err.value.headers["Server"]):
        assert server == "rerank-sidecar"
