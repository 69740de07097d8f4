"""Start-up and graceful shutdown: drain keeps in-flight work, refuses new work, reports NOT_SERVING;
the real `serve` process exits cleanly on SIGTERM."""

from __future__ import annotations

import signal
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


def test_drain_finishes_in_flight_and_refuses_new_work(bert_scorer: Scorer) -> None:
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
    assert "failed to load" in (tmp_path / "serve.log").read_text()
