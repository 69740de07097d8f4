"""The sidecar process: gRPC (API, health, reflection), HTTP/JSON and metrics on one event loop.

Start-up: ports bind at once with health NOT_SERVING; the model loads in a thread and a warm-up batch
runs; then health turns SERVING. SIGTERM: health NOT_SERVING first, new work refused, in-flight
requests get `drain_seconds` to finish, then the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import typing
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar._proto.reranker.v1 import reranker_pb2_grpc as pb_grpc
from sidecar.grpc_api import RerankerServicer
from sidecar.health import Health
from sidecar.metrics import Metrics
from sidecar.scoring.base import Scorer
from sidecar.service import RerankService
from sidecar.settings import Settings

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.so_reuseport", 0),
]


class SidecarServer:
    def __init__(self, settings: Settings, scorer: Scorer | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.service = RerankService(settings, self.metrics, scorer)
        self.health = Health()
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._http_runner: typing.Any = None
        self._metrics_server: typing.Any = None
        self.loaded: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind every port and begin loading the model; `loaded` completes when SERVING."""
        s = self.settings
        server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_RerankerServiceServicer_to_server(RerankerServicer(self.service), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        reflection.enable_server_reflection(
            (
                pb.DESCRIPTOR.services_by_name["RerankerService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self.grpc_port = server.add_insecure_port(f"{_host(s.host)}:{s.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"could not bind gRPC to {s.host}:{s.grpc_port}")
        await self.health.set_serving(False)
        await server.start()
        self._grpc = server
        await self._start_http()
        self._start_metrics()
        log.info(
            "listening: grpc %s:%d, http %s:%d, metrics %s:%d",
            s.host,
            self.grpc_port,
            s.host,
            self.http_port,
            s.host,
            self.metrics_port,
        )
        self.loaded = asyncio.get_running_loop().create_task(self._load(), name="load-model")

    async def _load(self) -> None:
        await self.service.start()
        await self.health.set_serving(True)

    async def _start_http(self) -> None:
        from aiohttp import web

        from sidecar.http_api import create_app

        app = create_app(self.service, self.metrics, self.settings)
        runner = web.AppRunner(app, shutdown_timeout=self.settings.drain_seconds, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.http_port)
        await site.start()
        self._http_runner = runner
        self.http_port = runner.addresses[0][1]

    def _start_metrics(self) -> None:
        from prometheus_client import start_http_server

        server, _ = start_http_server(
            self.settings.metrics_port, addr=self.settings.host, registry=self.metrics.registry
        )
        self._metrics_server = server
        self.metrics_port = server.server_port

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new work, let in-flight requests finish within the grace period."""
        grace = self.settings.drain_seconds if grace is None else grace
        log.info("draining (up to %.1fs, %d requests in flight)", grace, self.service.in_flight)
        loop = asyncio.get_running_loop()
        until = loop.time() + grace
        # Health answers NOT_SERVING (probes can see it) while new Rerank calls get UNAVAILABLE and
        # in-flight ones finish; only then do the listeners close.
        await self.health.shutdown()
        self.service.begin_drain()
        if self.loaded and not self.loaded.done():
            self.loaded.cancel()
        if not await self.service.wait_idle(grace):
            log.warning("drain period over with %d requests still in flight", self.service.in_flight)
        stops = []
        if self._grpc:
            stops.append(self._grpc.stop(max(0.0, until - loop.time())))
        if self._http_runner:
            stops.append(self._http_runner.cleanup())
        await asyncio.gather(*stops, return_exceptions=True)
        await self.service.close()
        if self._metrics_server:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log.info("stopped")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@contextlib.asynccontextmanager
async def running(settings: Settings, scorer: Scorer | None = None) -> AsyncIterator[SidecarServer]:
    """In-process server for tests and tools: started and SERVING inside the block, drained after."""
    server = SidecarServer(settings, scorer)
    await server.start()
    try:
        assert server.loaded is not None
        await server.loaded
        yield server
    finally:
        await server.stop()


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; exit code 0 after a clean drain, 1 if the model failed to load."""
    server = SidecarServer(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    assert server.loaded is not None
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({server.loaded, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if server.loaded.done() and not server.loaded.cancelled() and server.loaded.exception():
        log.error("the model failed to load: %s", server.loaded.exception())
        await server.stop(grace=0)
        return 1
    await stopper
    await server.stop()
    return 0
