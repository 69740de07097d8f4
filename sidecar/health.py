"""Standard grpc.health.v1 health: server side wiring and a client check (CLI, launcher, tests)."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from sidecar.settings import SERVICE_NAME

# "" is the whole server (what Kubernetes probes ask by default); SERVICE_NAME is the reranker API.
HEALTH_SERVICES = ("", SERVICE_NAME)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()

    async def set_serving(self, serving: bool) -> None:
        for name in HEALTH_SERVICES:
            await self.servicer.set(name, SERVING if serving else NOT_SERVING)

    async def shutdown(self) -> None:
        """NOT_SERVING for every service, and it stays so."""
        await self.servicer.enter_graceful_shutdown()


# What a health probe found: three answers, because "nothing is listening" and "loading" need different
# actions (start a sidecar vs wait for it).
PROBE_SERVING, PROBE_NOT_SERVING, PROBE_UNREACHABLE = "SERVING", "NOT_SERVING", "UNREACHABLE"


def probe(channel: grpc.Channel, service: str = "", timeout: float = 2.0) -> tuple[str, str]:
    """(one of the PROBE_* answers, a detail for people). A server that answers with any status other than
    SERVING is NOT_SERVING; no answer at all (refused, timed out, not a gRPC server) is UNREACHABLE."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return PROBE_UNREACHABLE, f"{code.name}: {exc.details()}"  # type: ignore[attr-defined]
        if code == grpc.StatusCode.NOT_FOUND:
            return PROBE_NOT_SERVING, f"the server does not know the health service {service!r}"
        return PROBE_UNREACHABLE, f"not a gRPC health server ({code.name}: {exc.details()})"  # type: ignore[attr-defined]
    if reply.status == SERVING:
        return PROBE_SERVING, ""
    return PROBE_NOT_SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def check(channel: grpc.Channel, service: str = "", timeout: float = 2.0) -> bool:
    return probe(channel, service, timeout)[0] == PROBE_SERVING


def wait_serving(channel: grpc.Channel, timeout: float, service: str = "") -> None:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if check(channel, service, timeout=min(2.0, max(0.1, until - time.monotonic()))):
            return
        time.sleep(0.1)
    raise TimeoutError(f"the sidecar did not report SERVING within {timeout:.0f}s")
