"""A user's ordinary mistakes get one clear line and a non-zero exit, never a traceback: no server at the
address, a model name that is neither a directory nor a reachable hub id; and `health` tells "nothing is
listening" (exit 3) from "up but not serving" (exit 1)."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.cli import EXIT_NOT_SERVING, EXIT_UNREACHABLE, main
from sidecar.scoring.base import Scorer
from tests.conftest import test_settings
from tests.fakes import RecordingScorer

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


def _cli(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("command", [["info"], ["rerank", "--query", "q", "--doc", "a"]])
def test_client_commands_without_a_server_print_one_line(command: list[str]) -> None:
    target = f"127.0.0.1:{_closed_port()}"
    done = _cli(*command, "--target", target)
    assert done.returncode == EXIT_UNREACHABLE
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"no sidecar is answering at {target}" in lines[0], done.stderr
    assert "rerank-sidecar serve" in lines[0]


def test_health_tells_nothing_listening_from_not_serving(
    bert_scorer: Scorer, server_factory, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--target", f"127.0.0.1:{_closed_port()}"]) == EXIT_UNREACHABLE
    assert capsys.readouterr().out.startswith("UNREACHABLE: no sidecar is answering")

    # Up, but its warm-up batch is held at the model: NOT_SERVING (exit 1), then SERVING (exit 0).
    gate = threading.Event()
    srv = server_factory(
        test_settings(warmup=True), scorer=RecordingScorer(bert_scorer, gate), wait_loaded=False
    )
    try:
        assert main(["health", "--target", srv.target]) == EXIT_NOT_SERVING
        assert capsys.readouterr().out.startswith("NOT_SERVING: the sidecar at")
    finally:
        gate.set()
    srv.call(srv._await_loaded())
    assert main(["health", "--target", srv.target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


@pytest.fixture
def fake_hub() -> Iterator[str]:
    """The Hugging Face hub cannot be reached from here, so this stands in for it (the one fake in this file):
    every model lookup answers 404 with the hub's 'repository not found' error code."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "Repository not found"}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("hub", ["unreachable", "offline", "no such model"])
def test_a_model_name_that_cannot_load_fails_within_seconds(hub: str, request: pytest.FixtureRequest) -> None:
    env = {
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
        "HF_HUB_CACHE": "/nonexistent",
    }
    if hub == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    elif hub == "no such model":
        env["HF_ENDPOINT"] = request.getfixturevalue("fake_hub")
    # Before: 165 s of retries and 60 warnings. The 60 s limit is the bound, generous for a loaded CI machine.
    ports = ["--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"]
    done = _cli("serve", "--model", "my-reranker", *ports, env=env, timeout=60)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr and "Retrying" not in done.stderr
    if hub == "no such model":
        assert "the hub has no such model" in errors[0] and "check the spelling" in errors[0]
    else:
        assert "cannot be reached" in errors[0] and "--model DIR" in errors[0]


def test_a_refused_request_is_one_line_with_its_status(
    bert_scorer: Scorer, server_factory, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = server_factory(scorer=bert_scorer)
    argv = ["rerank", "--target", srv.target, "--query", "q", "--doc", "a", "--instruction", "be strict"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "answered INVALID_ARGUMENT" in err[0] and "instruction" in err[0]
