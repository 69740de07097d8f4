"""Shared fixtures: tiny models built from configs (never downloaded) and an in-process server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# `--dtype auto` follows the CPU (bf16 on AMX / AVX512-BF16, float32 elsewhere), so a test that leaves it
# to auto would check different numbers on different machines. Every settings object and every `serve`
# process the tests start is float32 unless a test names another precision (tests/test_precision.py).
os.environ["RERANK_DTYPE"] = "float32"
# The score cache answers a repeated pair without the model; tests that count forward passes or provoke
# deadlines with repeated requests rely on every pair reaching it, so it is off unless a test turns it on
# (tests/test_score_cache.py).
os.environ["RERANK_SCORE_CACHE_BYTES"] = "0"

from sidecar.scoring.base import Scorer
from sidecar.settings import Settings

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "beir" / "scifact"


@pytest.fixture(scope="session")
def bert_ce_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sidecar.model_factory import build_bert_cross_encoder

    return build_bert_cross_encoder(tmp_path_factory.mktemp("models") / "tiny-bert-ce", max_length=64)


@pytest.fixture(scope="session")
def modernbert_ce_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sidecar.model_factory import build_modernbert_modular_cross_encoder

    return build_modernbert_modular_cross_encoder(tmp_path_factory.mktemp("models") / "tiny-modernbert-ce")


@pytest.fixture(scope="session")
def packaged_model_dir() -> Path:
    from sidecar.model_factory import packaged_embedding_model_dir

    return packaged_embedding_model_dir()


def make_scorer(model: Path | None, **overrides: object) -> Scorer:
    from sidecar.scoring.loading import load_scorer

    return load_scorer(Settings(model=str(model) if model else None, **overrides))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def bert_scorer(bert_ce_dir: Path) -> Scorer:
    return make_scorer(bert_ce_dir)


@pytest.fixture(scope="session")
def packaged_scorer() -> Scorer:
    return make_scorer(None)


class ServerThread:
    """A real SidecarServer on ephemeral ports, on its own event loop in a thread, for sync clients."""

    def __init__(self, settings: Settings, scorer: Scorer | None = None, wait_loaded: bool = True) -> None:
        from sidecar.server import SidecarServer

        self.server = SidecarServer(settings, scorer)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(60) or self._error:
            raise RuntimeError(f"server failed to start: {self._error}")
        if wait_loaded:
            self.call(self._await_loaded())

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # surfaced to the constructor
            self._error = exc
        self._started.set()
        self.loop.run_forever()

    async def _await_loaded(self) -> None:
        assert self.server.loaded is not None
        await self.server.loaded

    def call(self, coro, timeout: float = 120):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def stop(self, grace: float | None = 5.0) -> None:
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def test_settings(**overrides: object) -> Settings:
    base: dict[str, object] = {"grpc_port": 0, "http_port": 0, "metrics_port": 0, "max_wait_ms": 5.0}
    if "model" not in overrides:
        # Unset --model means the packaged model, whose shipped fusion weights `auto` would apply; the
        # tests inject other scorers under these settings, so they rank by the model unless they ask.
        base["fusion"] = "none"
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


test_settings.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture
def server_factory() -> Iterator:
    servers: list[ServerThread] = []

    def make(
        settings: Settings | None = None, scorer: Scorer | None = None, wait_loaded: bool = True
    ) -> ServerThread:
        srv = ServerThread(settings or test_settings(), scorer, wait_loaded)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        with contextlib.suppress(Exception):
            srv.stop(grace=1.0)
