"""TLS, mutual TLS and the bearer token on every port, with certificates the test makes (tests/tls.py):
real servers on ephemeral ports, real gRPC, HTTPS and CLI clients."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sidecar.cli import main
from sidecar.client import RerankerClient
from sidecar.launch import SidecarProcess
from sidecar.scoring.base import Scorer
from sidecar.security import ClientSecurity, grpc_channel
from sidecar.server import SidecarServer, StartupError
from tests.conftest import test_settings
from tests.tls import Pki, make_pki

TOKEN = "s3cret-token-for-tests"
DOCS = ["a reranker reorders documents", "bananas are yellow"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls(pki: Pki, **overrides: Any) -> dict[str, Any]:
    return {"tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key), **overrides}


def _context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """An HTTPS client's context made with the standard library alone, not with the code under test."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def _http(
    url: str, body: Any = None, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _rerank_body() -> dict[str, Any]:
    return {"query": "what does a reranker do", "documents": DOCS}


def _grpc_code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


# ---- TLS --------------------------------------------------------------------------------------
def test_tls_serves_every_port_to_clients_that_trust_the_ca_and_no_one_else(
    server_factory, bert_scorer: Scorer, pki: Pki
) -> None:
    srv = server_factory(test_settings(**_tls(pki)), scorer=bert_scorer)
    s = srv.server
    with RerankerClient(srv.target, ClientSecurity(ca_file=str(pki.ca))) as client:
        result = client.rerank("what does a reranker do", DOCS)
        assert len(result.hits) == 2 and result.model_id == bert_scorer.info.model_id
        client.wait_ready(10)  # health over the same TLS channel
    trusted = _context(pki.ca)
    status, _, body = _http(f"https://127.0.0.1:{s.http_port}/v1/rerank", _rerank_body(), context=trusted)
    assert status == 200 and len(json.loads(body)["results"]) == 2
    status, _, body = _http(f"https://127.0.0.1:{s.metrics_port}/metrics", context=trusted)
    assert status == 200 and b"reranker_requests_total" in body

    # A client that trusts another CA, and a plain-text client, get nothing.
    for security in (ClientSecurity(ca_file=str(pki.other_ca)), ClientSecurity()):
        with RerankerClient(srv.target, security) as client:
            assert _grpc_code(lambda c=client: c.info(timeout=5)) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(urllib.error.URLError) as err:
        _http(f"https://127.0.0.1:{s.http_port}/health", context=_context(pki.other_ca))
    assert isinstance(err.value.reason, ssl.SSLCertVerificationError)
    with pytest.raises((OSError, ConnectionError)):  # plain HTTP to a TLS port: the server hangs up
        _http(f"http://127.0.0.1:{s.http_port}/health")


def test_mutual_tls_refuses_a_client_without_a_certificate(
    server_factory, bert_scorer: Scorer, pki: Pki
) -> None:
    srv = server_factory(test_settings(**_tls(pki, tls_client_ca_file=str(pki.ca))), scorer=bert_scorer)
    s = srv.server
    ca_only = ClientSecurity(ca_file=str(pki.ca))
    with RerankerClient(srv.target, ca_only) as client:
        assert _grpc_code(lambda: client.info(timeout=5)) == grpc.StatusCode.UNAVAILABLE
    with_cert = ClientSecurity(
        ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
    )
    with RerankerClient(srv.target, with_cert) as client:
        assert len(client.rerank("what does a reranker do", DOCS).hits) == 2
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        _http(f"https://127.0.0.1:{s.http_port}/health", context=_context(pki.ca))
    mutual = _context(pki.ca, pki.client_cert, pki.client_key)
    assert _http(f"https://127.0.0.1:{s.http_port}/v1/rerank", _rerank_body(), context=mutual)[0] == 200
    assert _http(f"https://127.0.0.1:{s.metrics_port}/metrics", context=mutual)[0] == 200
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        _http(f"https://127.0.0.1:{s.metrics_port}/metrics", context=_context(pki.ca))


# ---- bearer token -----------------------------------------------------------------------------
def test_a_missing_or_wrong_token_is_unauthenticated_while_health_and_metrics_answer(
    server_factory, bert_scorer: Scorer
) -> None:
    srv = server_factory(test_settings(auth_token=TOKEN), scorer=bert_scorer)
    url = f"http://127.0.0.1:{srv.server.http_port}"
    for token in (None, "wrong-token", TOKEN[:-1]):
        with RerankerClient(srv.target, ClientSecurity(token=token)) as client:
            assert _grpc_code(lambda c=client: c.rerank("q", DOCS)) == grpc.StatusCode.UNAUTHENTICATED
            assert _grpc_code(lambda c=client: c.info()) == grpc.StatusCode.UNAUTHENTICATED
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        status, reply_headers, body = _http(f"{url}/v1/rerank", _rerank_body(), headers)
        assert status == 401 and reply_headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(body)["error"]["code"] == "unauthenticated"
        assert _http(f"{url}/v1/info", headers=headers)[0] == 401
    with grpc_channel(srv.target) as channel:  # reflection (a streaming method) is not exempt by default
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert _grpc_code(lambda: list(replies)) == grpc.StatusCode.UNAUTHENTICATED
        # Exempt by default: health and metrics, with no token at all.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    for path in ("/health", "/healthz", "/metrics"):
        assert _http(f"{url}{path}")[0] == 200, path
    status, _, metrics = _http(f"http://127.0.0.1:{srv.server.metrics_port}/metrics")
    assert status == 200
    # Per wrong token: Rerank and Info on gRPC, /v1/rerank and /v1/info on HTTP; reflection once more.
    assert b'reranker_auth_refused_total{api="grpc"} 7.0' in metrics
    assert b'reranker_auth_refused_total{api="http"} 6.0' in metrics

    with RerankerClient(srv.target, ClientSecurity(token=TOKEN)) as client:
        assert len(client.rerank("what does a reranker do", DOCS).hits) == 2
        assert client.info().model_id == bert_scorer.info.model_id
    for scheme in ("Bearer", "bearer"):
        assert _http(f"{url}/v1/rerank", _rerank_body(), {"Authorization": f"{scheme} {TOKEN}"})[0] == 200


def test_what_is_exempt_from_the_token_is_configurable(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(test_settings(auth_token=TOKEN, auth_exempt="info"), scorer=bert_scorer)
    url = f"http://127.0.0.1:{srv.server.http_port}"
    assert _http(f"{url}/health")[0] == 401 and _http(f"{url}/metrics")[0] == 401
    assert _http(f"{url}/v1/info")[0] == 200
    with RerankerClient(srv.target) as client:
        assert client.info().model_id == bert_scorer.info.model_id
        stub = health_pb2_grpc.HealthStub(client.channel)
        assert _grpc_code(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


# ---- the CLI and the launcher -------------------------------------------------------------------
def test_cli_reaches_a_tls_and_token_server_and_says_what_is_missing(
    server_factory,
    bert_scorer: Scorer,
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RERANK_AUTH_TOKEN", raising=False)
    srv = server_factory(test_settings(**_tls(pki), auth_token=TOKEN), scorer=bert_scorer)
    tls = ["--target", srv.target, "--ca-file", str(pki.ca)]
    assert main(["info", *tls, "--token", TOKEN]) == 0
    assert json.loads(capsys.readouterr().out)["modelId"] == bert_scorer.info.model_id
    assert main(["health", *tls]) == 0 and capsys.readouterr().out.strip() == "SERVING"

    assert main(["rerank", *tls, "--query", "q", "--doc", "d"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "UNAUTHENTICATED" in err and "bearer token" in err
    assert main(["info", "--target", srv.target, "--token", TOKEN]) == 3  # plain text to a TLS server
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--ca-file" in err, err
    assert main(["info", "--target", srv.target, "--ca-file", str(pki.other_ca), "--token", TOKEN]) == 3
    assert "TLS handshake" in capsys.readouterr().err


def test_launched_sidecar_with_tls_and_token(bert_ce_dir: Path, pki: Pki, tmp_path: Path) -> None:
    args = [
        "--model",
        str(bert_ce_dir),
        "--tls-cert-file",
        str(pki.server_cert),
        "--tls-key-file",
        str(pki.server_key),
    ]
    security = ClientSecurity(ca_file=str(pki.ca), token=TOKEN)
    with SidecarProcess(args, env={"RERANK_AUTH_TOKEN": TOKEN}, security=security, ready_timeout=120) as proc:
        with proc.client() as client:
            assert client.info().max_length == 64
        assert proc.http_url.startswith("https://")
        status, _, _ = _http(
            f"{proc.http_url}/v1/info", headers=security.http_headers(), context=security.ssl_context()
        )
        assert status == 200


# ---- start-up ---------------------------------------------------------------------------------
def test_a_non_loopback_bind_without_tls_or_token_warns_loudly(
    server_factory, bert_scorer: Scorer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sidecar.server")
    server_factory(test_settings(host="0.0.0.0"), scorer=bert_scorer)
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "SECURITY" in r.getMessage()
    ]
    assert len(warnings) == 2
    assert "without TLS" in warnings[0] and "without authentication" in warnings[1]
    caplog.clear()
    server_factory(test_settings(host="0.0.0.0", auth_token=TOKEN, **_tls(pki)), scorer=bert_scorer)
    server_factory(test_settings(host="127.0.0.1"), scorer=bert_scorer)
    assert not [r for r in caplog.records if "SECURITY" in r.getMessage()]


def test_unusable_tls_files_are_one_clear_start_up_error(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def start(**overrides: Any) -> str:
        server = SidecarServer(test_settings(**overrides))
        with pytest.raises(StartupError) as err:
            await server.start()
        return str(err.value)

    missing = asyncio.run(start(**_tls(pki, tls_cert_file=str(tmp_path / "nope.pem"))))
    assert "cannot read --tls-cert-file" in missing and "nope.pem" in missing
    mismatched = asyncio.run(start(**_tls(pki, tls_key_file=str(pki.client_key))))
    assert "cannot be used" in mismatched
    assert main(["serve", "--tls-cert-file", str(pki.server_cert)]) == 2
    assert "--tls-cert-file and --tls-key-file go together" in capsys.readouterr().err
