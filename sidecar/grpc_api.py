"""gRPC front end: translates reranker.v1 messages to the service's types and back. Computes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar._proto.reranker.v1 import reranker_pb2_grpc as pb_grpc
from sidecar.errors import (
    InvalidInput,
    PayloadTooLarge,
    RerankError,
    Unauthenticated,
    outcome_label,
    public_message,
    status_of,
)
from sidecar.fusion_pb import fusion_from_proto, fusion_to_proto
from sidecar.metrics import Metrics
from sidecar.security import AUTHORIZATION, bearer_ok
from sidecar.service import RerankService
from sidecar.settings import SERVICE_NAME
from sidecar.types import Document, HitStatus, RerankQuery, RerankResult, ServiceInfo

log = logging.getLogger(__name__)
API = "grpc"
_HIT_STATUS = {HitStatus.RERANKED: pb.HIT_STATUS_RERANKED, HitStatus.FALLBACK: pb.HIT_STATUS_FALLBACK}


def query_from_proto(request: pb.RerankRequest, time_remaining: float | None) -> RerankQuery:
    loop = asyncio.get_running_loop()
    return RerankQuery(
        query=request.query,
        documents=[
            Document(
                text=d.text,
                id=d.id,
                title=d.title if d.HasField("title") else None,
                first_stage_score=d.first_stage_score if d.HasField("first_stage_score") else None,
            )
            for d in request.documents
        ],
        top_n=request.top_n if request.HasField("top_n") and request.top_n > 0 else None,
        instruction=request.instruction if request.HasField("instruction") else None,
        deadline=None if time_remaining is None else loop.time() + time_remaining,
        fusion=fusion_from_proto(request.fusion) if request.HasField("fusion") else None,
        fail_open=request.fail_open if request.HasField("fail_open") else None,
        bypass_cache=request.bypass_cache,
        partial_results=request.partial_results if request.HasField("partial_results") else None,
        max_windows=request.max_windows if request.HasField("max_windows") and request.max_windows else None,
    )


def result_to_proto(result: RerankResult) -> pb.RerankResponse:
    response = pb.RerankResponse(
        model_id=result.model_id, model_revision=result.model_revision, cached_pairs=result.cached_pairs
    )
    for h in result.hits:
        response.results.add(
            index=h.index,
            id=h.id,
            score=h.score,
            first_stage_score=h.first_stage_score,
            status=_HIT_STATUS[h.status],
            fallback_reason=h.fallback_reason,
            truncated=h.truncated,
            fused_score=h.ranking_score,
            passage_start=h.passage_start,
            passage_end=h.passage_end,
            windows=h.windows,
        )
    response.fusion.CopyFrom(fusion_to_proto(result.fusion))
    t = result.timings
    response.timings.CopyFrom(
        pb.Timings(
            queue_seconds=t.queue_seconds,
            inference_seconds=t.inference_seconds,
            total_seconds=t.total_seconds,
            batches=t.batches,
        )
    )
    return response


class Unreadable:
    """What the deserializer hands the servicer instead of raising: a message that is not a valid
    request (corrupt or truncated bytes, invalid UTF-8 in a string) or is over the size limit.

    A raising deserializer would make grpc answer UNKNOWN with the exception's class name and log a
    traceback per call; this way the client gets INVALID_ARGUMENT and the log stays quiet."""

    def __init__(self, error: InvalidInput) -> None:
        self.error = error


def _tolerant(message_cls: Any, max_bytes: int) -> Callable[[bytes], Any]:
    name = message_cls.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        if len(data) > max_bytes:
            return Unreadable(
                PayloadTooLarge(
                    f"the {len(data)}-byte message exceeds the limit of {max_bytes} bytes: send fewer or "
                    "shorter documents (the operator can raise RERANK_MAX_BODY_BYTES)"
                )
            )
        try:
            return message_cls.FromString(data)
        except Exception:  # DecodeError and whatever else a parser may raise: never UNKNOWN
            return Unreadable(
                InvalidInput(
                    f"the message is not a valid {name} (corrupt or truncated protobuf, or a string field "
                    "that is not UTF-8): send it with a generated reranker.v1 client"
                )
            )

    return deserialize


def add_to_server(servicer: RerankerServicer, server: grpc.aio.Server, max_message_bytes: int) -> None:
    """Register reranker.v1.RerankerService with tolerant deserializers (what the generated
    `add_RerankerServiceServicer_to_server` does, but a bad message gets INVALID_ARGUMENT, counted)."""

    def count(error: InvalidInput) -> None:
        servicer.service.metrics.requests.labels(API, outcome_label(error)).inc()

    add_tolerant(
        server, pb.DESCRIPTOR.services_by_name["RerankerService"], pb, servicer, max_message_bytes, count
    )


def add_tolerant(
    server: grpc.aio.Server,
    service: Any,
    messages: Any,
    servicer: Any,
    max_message_bytes: int,
    on_unreadable: Callable[[InvalidInput], None] | None = None,
) -> None:
    """Register every method of `service` (a service descriptor; `messages` its generated module) that
    `servicer` implements, with deserializers that never raise: an `Unreadable` request is refused with
    its InvalidInput (answered by `StatusInterceptor`) before the servicer sees it."""

    def guarded(method: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Unreadable):
                if on_unreadable is not None:
                    on_unreadable(request.error)
                raise request.error
            return await method(request, context)

        return call

    handlers = {}
    for m in service.methods:
        if m.client_streaming or not hasattr(servicer, m.name):
            continue
        kind = (
            grpc.unary_stream_rpc_method_handler
            if m.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[m.name] = kind(
            guarded(getattr(servicer, m.name)),
            request_deserializer=_tolerant(getattr(messages, m.input_type.name), max_message_bytes),
            response_serializer=getattr(messages, m.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class StatusInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The one place the gRPC front end turns exceptions into statuses (sidecar.errors' table): servicer
    methods raise, never abort. Anything unexpected is INTERNAL with a generic message and its traceback
    in the log. Listed first, so it also answers what the interceptors after it raise (AuthInterceptor).
    Async-generator methods (reflection) pass through untouched: they raise nothing of ours."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return handler
        behaviour = _behaviour(handler)
        if inspect.isasyncgenfunction(behaviour):  # an async generator cannot be awaited whole
            return handler
        return _with_behaviour(handler, _answering(behaviour, details.method))


def _behaviour(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    if handler.request_streaming:
        return handler.stream_stream if handler.response_streaming else handler.stream_unary  # type: ignore[no-any-return]
    return handler.unary_stream if handler.response_streaming else handler.unary_unary  # type: ignore[no-any-return]


def _with_behaviour(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """`handler` (same kind, same (de)serializers) running `behaviour` instead."""
    if handler.request_streaming:
        kind = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
    else:
        kind = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
    return kind(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _answering(behaviour: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:  # a method that aborted itself chose its own status
            raise
        except RerankError as exc:
            await context.abort(status_of(exc).grpc, public_message(exc))
        except Exception as exc:
            log.exception("unexpected error in %s", method)
            await context.abort(status_of(exc).grpc, public_message(exc))

    return call


# What each `auth_exempt` name opens on gRPC (method-name prefixes).
GRPC_EXEMPT = {
    "health": ("/grpc.health.v1.Health/",),
    "reflection": ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/"),
    "info": (f"/{SERVICE_NAME}/Info",),
    "metrics": (),  # HTTP only
}


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every call but the exempt ones must carry `authorization: Bearer <auth_token>`; others are
    refused with Unauthenticated before their method runs (answered by StatusInterceptor)."""

    def __init__(self, token: str, exempt: set[str], metrics: Metrics) -> None:
        self._token = token
        self._metrics = metrics
        self._open = tuple(prefix for name in sorted(exempt) for prefix in GRPC_EXEMPT[name])

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open):
            return handler
        header = next((v for k, v in details.invocation_metadata or () if k == AUTHORIZATION), None)
        if bearer_ok(header, self._token):
            return handler
        self._metrics.auth_refused.labels(API).inc()
        refusal = Unauthenticated.for_header(header)

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            raise refusal

        return _with_behaviour(handler, refuse)


def info_to_proto(info: ServiceInfo) -> pb.InfoResponse:
    fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(info) if f.name != "default_fusion"}
    return pb.InfoResponse(**fields, default_fusion=fusion_to_proto(info.default_fusion))


class RerankerServicer(pb_grpc.RerankerServiceServicer):
    """Translation only: errors go up to `StatusInterceptor`."""

    def __init__(self, service: RerankService) -> None:
        self.service = service

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        with self.service.counting_refusals(API):
            query = query_from_proto(request, context.time_remaining())
        return result_to_proto(await self.service.rerank(query, API))

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return info_to_proto(self.service.info())
