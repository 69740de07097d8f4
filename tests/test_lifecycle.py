"""Start-up and graceful shutdown: drain keeps in-flight work, refuses new work, reports NOT_SERVING;
the real `serve` process exits cleanly on SIGTERM."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar._proto.reranker.v1 import reranker_pb2_grpc as pb_grpc
from sidecar.client import RerankerClient
from sidecar.launch import SidecarProcess
from sidecar.scoring.base import Scorer
from tests.conftest import ServerThread, test_settings
from tests.fakes import RecordingScorer


def test_drain_finishes_in_flight_and_refuses_new_work(
    bert_scorer: Scorer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.server")
    gate = threading.Event()
    rec = RecordingScorer(bert_scorer, gate)
    srv = ServerThread(test_settings(warmup=False, max_wait_ms=0), scorer=rec)
    channel = grpc.insecure_channel(srv.target)
    stub = pb_grpc.RerankerServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    with ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(
            stub.Rerank, pb.RerankRequest(query="q", documents=[pb.Document(text="d")] * 3), timeout=30
        )
        assert rec.entered.wait(10)
        stopping = pool.submit(srv.call, srv.server.stop(10.0))
        deadline = time.monotonic() + 5
        while (
            health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            != health_pb2.HealthCheckResponse.NOT_SERVING
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(pb.RerankRequest(query="new", documents=[pb.Document(text="d")]), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        gate.set()
        assert len(in_flight.result(30).results) == 3  # nothing lost
        stopping.result(30)
    assert "draining (up to 10.0s, 1 request in flight)" in caplog.text
    assert "new" not in {p.query for p in rec.seen}
    channel.close()
    srv.loop.call_soon_threadsafe(srv.loop.stop)


def test_serve_process_answers_and_exits_cleanly_on_sigterm(bert_ce_dir: Path, tmp_path: Path) -> None:
    sc = SidecarProcess(
        ["--model", str(bert_ce_dir), "--drain-seconds", "5"], log_path=tmp_path / "serve.log"
    )
    with sc:
        with RerankerClient(sc.grpc_target) as client:
            assert client.info().model_id == str(bert_ce_dir)
            assert len(client.rerank("q", ["a", "b"]).hits) == 2
        assert sc.proc is not None
        sc.proc.send_signal(signal.SIGTERM)
        assert sc.proc.wait(30) == 0
    log = (tmp_path / "serve.log").read_text()
    assert "draining" in log and "stopped" in log


def test_unreachable_hub_id_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.scoring.loading import ModelLoadError, load_scorer
    from sidecar.settings import Settings

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="pass --model DIR"):
        load_scorer(Settings(model="cross-encoder/ms-marco-MiniLM-L6-v2"))


def test_missing_model_directory_is_named() -> None:
    from sidecar.scoring.loading import resolve_source

    with pytest.raises(ValueError, match="not a model directory"):
        resolve_source("./no-such-model-dir", None)


def test_serve_exits_non_zero_when_the_model_cannot_load(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")  # a directory, but no model in it
    sc = SidecarProcess(["--model", str(tmp_path)], ready_timeout=120, log_path=tmp_path / "serve.log")
    with pytest.raises(RuntimeError, match="exited with code 1"):
        sc.start()
    log = (tmp_path / "serve.log").read_text()
    assert "failed to load" in log
    assert "drain" not in log  # nothing was served, so nothing is drained


def _serve_cmd(*args: str) -> list[str]:
    ports = {"--grpc-port": "0", "--http-port": "0", "--metrics-port": "0"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        ports[flag] = value
    return [
        sys.executable,
        "-m",
        "sidecar",
        "serve",
        "--host",
        "127.0.0.1",
        *(x for kv in ports.items() for x in kv),
    ]


@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port", "--metrics-port"])
def test_a_busy_port_is_one_clear_line_and_a_non_zero_exit(flag: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(_serve_cmd(flag, str(port)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and " ERROR " in errors[0], proc.stderr
    assert f"127.0.0.1:{port}" in errors[0] and "already in use" in errors[0] and flag in errors[0]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr


def test_a_busy_port_shows_the_traceback_at_debug_level() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [*_serve_cmd("--http-port", str(port)), "--log-level", "DEBUG"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "already in use" in proc.stderr


def _run_until(proc: subprocess.Popen[str], marker: str, timeout: float = 120) -> list[str]:
    """Lines of the process's log up to and including the first holding `marker`."""
    assert proc.stderr is not None
    lines: list[str] = []
    until = time.monotonic() + timeout
    for line in proc.stderr:
        lines.append(line)
        if marker in line:
            return lines
        assert time.monotonic() < until, "".join(lines)
    raise AssertionError(f"{marker!r} never logged:\n{''.join(lines)}")


def test_serve_exits_promptly_after_logging_stopped(bert_ce_dir: Path) -> None:
    cmd = [*_serve_cmd(), "--model", str(bert_ce_dir), "--drain-seconds", "2"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        _run_until(proc, "INFO sidecar.service: serving")
        proc.send_signal(signal.SIGTERM)
        _run_until(proc, "INFO sidecar.server: stopped")
        stopped_at = time.monotonic()
        # Interpreter teardown (torch, tokenizers, grpc) used to take seconds more on this machine.
        assert proc.wait(30) == 0
        assert time.monotonic() - stopped_at < 1.0
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_while_the_model_loads_exits_at_once() -> None:
    # The packaged model takes seconds to load; the drain must not wait for the loading thread.
    proc = subprocess.Popen([*_serve_cmd(), "--drain-seconds", "1"], stderr=subprocess.PIPE, text=True)
    try:
        _run_until(proc, "listening:")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        lines = _run_until(proc, "INFO sidecar.server: stopped")
        assert proc.wait(30) == 0
        assert time.monotonic() - signalled < 1 + 3.0  # the drain, plus a few seconds at most
        assert not any("serving" in line for line in lines)
    finally:
        proc.kill()
        proc.wait()
