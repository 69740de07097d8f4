"""Fixtures for the OpenSearch integration: an in-process sidecar with its HTTP port, a raw HTTP helper
(arbitrary bytes and headers, so bad input can be sent as is), and an osmem-server."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest

from sidecar.scoring.base import Scorer
from tests.conftest import ServerThread, test_settings


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


def http_request(
    base_url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    chunked: bool = False,
    timeout: float = 60.0,
) -> Reply:
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        # Like ml-commons (ConnectorUtils.buildSdkRequest): Content-Type only when the caller set none.
        hdrs = dict(headers or {})
        if not any(k.lower() == "content-type" for k in hdrs):
            hdrs["Content-Type"] = "application/json"
        if chunked and body is not None:
            conn.putrequest(method, path)
            for k, v in {**hdrs, "Transfer-Encoding": "chunked"}.items():
                conn.putheader(k, v)
            conn.endheaders()
            step = 64 << 10
            for i in range(0, len(body), step):
                chunk = body[i : i + step]
                try:
                    conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break  # the server answered early and closed; read its answer below
            else:
                conn.send(b"0\r\n\r\n")
        else:
            conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def post_json(base_url: str, path: str, obj: Any, headers: dict[str, str] | None = None) -> Reply:
    return http_request(base_url, "POST", path, json.dumps(obj).encode("utf-8"), headers)


class HttpServer:
    """A real SidecarServer (gRPC + HTTP on ephemeral ports) in a thread, with its HTTP base URL."""

    def __init__(self, scorer: Scorer, **settings: Any) -> None:
        self.thread = ServerThread(test_settings(**settings), scorer)
        self.server = self.thread.server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def target(self) -> str:
        return self.thread.target

    def stop(self) -> None:
        self.thread.stop(grace=1.0)


@pytest.fixture(scope="module")
def sidecar_http(bert_scorer: Scorer) -> Iterator[HttpServer]:
    """One in-process sidecar serving the tiny BERT cross-encoder, shared by a module's tests."""
    srv = HttpServer(bert_scorer)
    yield srv
    srv.stop()


# ---- a real OpenSearch node -------------------------------------------------------------------
REQUIRE_ENV = "RERANK_REQUIRE_OPENSEARCH"
START_ENV = "RERANK_OPENSEARCH_START"


@pytest.fixture(scope="session")
def opensearch_url() -> Iterator[str]:
    """OPENSEARCH_URL when set; else, with RERANK_OPENSEARCH_START=1 (or RERANK_REQUIRE_OPENSEARCH=1), a node
    started by the project's own `rerank-sidecar opensearch node start` on a free port and stopped after."""
    import os
    import subprocess
    import sys

    url = os.environ.get("OPENSEARCH_URL")
    if url:
        yield url
        return
    if os.environ.get(START_ENV) != "1" and os.environ.get(REQUIRE_ENV) != "1":
        pytest.skip(
            f"no OpenSearch: set OPENSEARCH_URL, or {START_ENV}=1 to start one with "
            "`rerank-sidecar opensearch node start` (needs Java and Maven)"
        )
    from sidecar.launch import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "sidecar", "opensearch", "node"]
    args = ["--port", str(port)]
    started = subprocess.run([*cmd, "start", *args], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.fail(f"`rerank-sidecar opensearch node start` failed: {started.stderr.strip()[-500:]}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([*cmd, "stop", *args], capture_output=True, timeout=120)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """Under RERANK_REQUIRE_OPENSEARCH=1 (set by .ci/run) a real-cluster test that skips has failed."""
    import os

    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(REQUIRE_ENV) == "1" and item.get_closest_marker("opensearch"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"{REQUIRE_ENV}=1 and this real-cluster test skipped: {reason}"
