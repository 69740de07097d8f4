"""The sidecar process: gRPC (API, health, reflection), HTTP/JSON and metrics on one event loop.

Start-up: ports bind at once with health NOT_SERVING; the model loads in a thread and a warm-up batch
runs; then health turns SERVING. SIGTERM: health NOT_SERVING first, new work refused, in-flight
requests get `drain_seconds` to finish, then the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import typing
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar.batcher import Batcher
from sidecar.grpc_api import (
    AuthInterceptor,
    RerankerServicer,
    StatusInterceptor,
    add_to_server,
    add_tolerant,
)
from sidecar.health import Health
from sidecar.metrics import Metrics
from sidecar.scoring.base import Scorer
from sidecar.security import SecurityError, ServerTls, exposure_warnings, server_tls
from sidecar.service import RerankService
from sidecar.settings import Settings, env_name, flag_name

log = logging.getLogger(__name__)

# Messages over max_body_bytes are refused INVALID_ARGUMENT by our deserializer (they can never
# succeed); gRPC itself refuses those over this many times the limit (RESOURCE_EXHAUSTED), so no
# message of any size is buffered whole.
GRPC_HARD_LIMIT_FACTOR = 2


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    s = settings
    keepalive_ms = int(s.grpc_keepalive_s * 1000)
    return [
        ("grpc.max_receive_message_length", GRPC_HARD_LIMIT_FACTOR * s.max_body_bytes),
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.so_reuseport", 0),
        # Connections that never finish the HTTP/2 handshake (a raw or slow TCP client).
        ("grpc.server_handshake_timeout_ms", int(s.connection_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", int(s.grpc_idle_timeout_s * 1000)),
        # Our pings find dead peers; clients' pings faster than ours are abuse (GOAWAY after 2 strikes).
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", keepalive_ms),
        ("grpc.http2.max_ping_strikes", 2),
    ]


# After the drain, how long RPCs still open (Health.Watch streams, answers being written) may take.
CLOSE_GRACE_S = 1.0
LINGER_S = 2.0


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
        self._watch: asyncio.Task[None] | None = None
        self._tls: ServerTls | None = None

    async def start(self) -> None:
        """Bind every port and begin loading the model; `loaded` completes when SERVING."""
        s = self.settings
        try:
            self._tls = server_tls(s)
        except SecurityError as exc:
            raise StartupError(str(exc)) from exc
        for warning in exposure_warnings(s):
            log.warning("%s", warning)
        # StatusInterceptor first: it answers what the others raise.
        interceptors: list[grpc.aio.ServerInterceptor] = [StatusInterceptor()]
        if s.auth_token is not None:
            interceptors.append(AuthInterceptor(s.auth_token, s.exempt, self.metrics))
        server = grpc.aio.server(options=grpc_options(s), interceptors=interceptors)
        add_to_server(RerankerServicer(self.service), server, s.max_body_bytes)
        health = health_pb2.DESCRIPTOR.services_by_name["Health"]
        add_tolerant(server, health, health_pb2, self.health.servicer, s.max_body_bytes)
        reflection.enable_server_reflection(
            (
                pb.DESCRIPTOR.services_by_name["RerankerService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        # Probed first: grpc's own failure says only "Failed to bind" and prints a C++ log line too.
        if s.grpc_port and (code := _probe_bind(s.host, s.grpc_port)) is not None:
            raise _bind_error("gRPC", s.host, s.grpc_port, "grpc_port", code)
        try:
            address = f"{_host(s.host)}:{s.grpc_port}"
            if self._tls is None:
                self.grpc_port = server.add_insecure_port(address)
            else:
                self.grpc_port = server.add_secure_port(address, self._tls.grpc_credentials())
        except RuntimeError as exc:
            raise _bind_error("gRPC", s.host, s.grpc_port, "grpc_port", None) from exc
        await self.health.set_serving(False)
        await server.start()
        self._grpc = server
        try:
            await self._start_http()
            self._start_metrics()
        except BaseException:
            await self._close(0, quiet=True)  # release what did start; the caller reports why
            raise
        log.info(
            "listening%s: grpc %s:%d, http %s:%d, metrics %s:%d",
            " with TLS" if self._tls else "",
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
        assert self.service.batcher is not None
        self._watch = asyncio.get_running_loop().create_task(self._watch_batcher(self.service.batcher))

    async def _watch_batcher(self, batcher: Batcher) -> None:
        """Health tells the truth: a batcher that died cannot score, so probes must see NOT_SERVING."""
        await batcher.failed
        self.metrics.ready.set(0)
        await self.health.set_serving(False)

    async def _start_http(self) -> None:
        from aiohttp import web

        from sidecar.http_api import create_app

        app = create_app(self.service, self.metrics, self.settings)
        # Handlers are cancelled when their client disconnects (its pairs then never reach the model);
        # by the time the runner shuts down, every request was answered, so its timeout only covers
        # writing the last answers.
        # aiohttp's keep-alive timer runs from a connection's start and from each answer until a
        # complete request (headers) arrives: it is the header and idle timeout.
        runner = web.AppRunner(
            app,
            shutdown_timeout=CLOSE_GRACE_S,
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=self.settings.connection_timeout_s,
            # After an early answer (413, 408) the rest of a body is read and dropped for at most this
            # long, so the client sees the answer; a body that keeps trickling is then cut off.
            lingering_time=LINGER_S,
        )
        await runner.setup()
        self._http_runner = runner
        ssl_context = self._tls.ssl_context if self._tls else None
        site = web.TCPSite(runner, self.settings.host, self.settings.http_port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise _bind_error(
                "HTTP", self.settings.host, self.settings.http_port, "http_port", exc.errno
            ) from exc
        self.http_port = runner.addresses[0][1]

    def _start_metrics(self) -> None:
        from prometheus_client import start_http_server

        s = self.settings
        try:
            tls = self._tls
            server, _ = start_http_server(
                s.metrics_port,
                addr=s.host,
                registry=self.metrics.registry,
                certfile=tls.cert_file if tls else None,
                keyfile=tls.key_file if tls else None,
                client_cafile=tls.client_ca_file if tls else None,
                client_auth_required=bool(tls and tls.client_ca_file),
            )
        except OSError as exc:
            raise _bind_error("metrics", s.host, s.metrics_port, "metrics_port", exc.errno) from exc
        self._metrics_server = server
        self.metrics_port = server.server_port

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new work, let in-flight requests finish within the grace period."""
        grace = self.settings.drain_seconds if grace is None else grace
        log.info("draining (up to %.1fs, %s in flight)", grace, _requests(self.service.in_flight))
        # Health answers NOT_SERVING (probes can see it) while new Rerank calls get UNAVAILABLE and
        # in-flight ones finish; only then do the listeners close.
        await self.health.shutdown()
        self.service.begin_drain()
        if self.loaded and not self.loaded.done():
            self.loaded.cancel()
        if not await self.service.wait_idle(grace):
            log.warning(
                "drain period over with %s still in flight: answering UNAVAILABLE / 503",
                _requests(self.service.in_flight),
            )
            self.service.abort_in_flight()
            await self.service.wait_idle(CLOSE_GRACE_S)
        await self._close(CLOSE_GRACE_S)

    async def _close(self, grace: float, quiet: bool = False) -> None:
        """Close the listeners (RPCs still open get `grace` seconds), the batcher and the metrics server."""
        if self._watch:
            self._watch.cancel()
        if not quiet:
            log.info("closing the listeners")
        stops = []
        if self._grpc:
            stops.append(self._grpc.stop(grace))
        if self._http_runner:
            stops.append(self._http_runner.cleanup())
        await asyncio.gather(*stops, return_exceptions=True)
        await self.service.close()
        if self._metrics_server:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if not quiet:
            log.info("stopped")


class StartupError(Exception):
    """The server cannot start for a reason the operator can fix; the message says how."""


def _bind_error(what: str, host: str, port: int, field: str, code: int | None) -> StartupError:
    """One line naming the port, why it could not be bound (`code`, an errno), and the flag that moves it."""
    if code == errno.EADDRINUSE:
        why = "the port is already in use (is another sidecar still running?)"
    elif code == errno.EACCES:
        why = "permission denied (ports below 1024 need privileges)"
    elif code == errno.EADDRNOTAVAIL:
        why = f"{host} is not an address of this machine"
    else:
        why = os.strerror(code) if code else "the address cannot be bound"
    return StartupError(
        f"cannot listen for {what} on {host}:{port}: {why}; stop whatever holds it or pick another port "
        f"with {flag_name(field)} / {env_name(field)} (0 picks a free one)"
    )


def _probe_bind(host: str, port: int) -> int | None:
    """The errno a bind of (host, port) gets now (None: it would succeed), with SO_REUSEADDR as grpc
    sets it, so a port whose old connections are in TIME_WAIT does not look busy."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            return exc.errno
    return None


def _requests(n: int) -> str:
    return f"{n} request" if n == 1 else f"{n} requests"


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
    """Run until SIGTERM/SIGINT; exit code 0 after a clean drain, 1 if the server could not start or the
    model failed to load."""
    server = SidecarServer(settings)
    # Before the ports open: a SIGTERM right after "listening" must drain, not kill.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except StartupError as exc:
        # One line for an operator's mistake; the traceback only when asked for.
        log.error("%s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    assert server.loaded is not None
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({server.loaded, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if server.loaded.done() and not server.loaded.cancelled() and server.loaded.exception():
        log.error("the model failed to load: %s", server.loaded.exception())
        # Nothing was ever served, so there is nothing to drain.
        await server._close(0)
        return 1
    await stopper
    await server.stop()
    return 0


def main(settings: Settings) -> typing.NoReturn:
    """`serve` as a process: run, then exit at once.

    Interpreter teardown (torch, tokenizers, grpc) takes seconds after "stopped", and a model load
    cancelled by SIGTERM would keep its thread running to the end: both would stretch the drain the
    operator configured. Everything worth keeping is flushed first.
    """
    code = asyncio.run(serve(settings))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
