"""gRPC front end: translates reranker.v1 messages to the service's types and back. Computes nothing."""

from __future__ import annotations

import asyncio

import grpc

from sidecar import __version__
from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar._proto.reranker.v1 import reranker_pb2_grpc as pb_grpc
from sidecar.errors import RerankError, outcome_label, public_message, status_of
from sidecar.fusion_pb import fusion_from_proto, fusion_to_proto
from sidecar.service import RerankService
from sidecar.types import Document, HitStatus, RerankQuery, RerankResult

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
    )


def result_to_proto(result: RerankResult) -> pb.RerankResponse:
    response = pb.RerankResponse(model_id=result.model_id, model_revision=result.model_revision)
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


class RerankerServicer(pb_grpc.RerankerServiceServicer):
    def __init__(self, service: RerankService) -> None:
        self.service = service

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        try:
            query = query_from_proto(request, context.time_remaining())
        except RerankError as exc:
            # Refused before the service saw it, so the service's request counter did not count it.
            self.service.metrics.requests.labels(API, outcome_label(exc)).inc()
            await context.abort(status_of(exc).grpc, public_message(exc))
        try:
            result = await self.service.rerank(query, API)
        except RerankError as exc:
            await context.abort(status_of(exc).grpc, public_message(exc))
        return result_to_proto(result)

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        try:
            info = self.service.model_info()
            default_fusion = self.service.fusion_default()
        except RerankError as exc:
            await context.abort(status_of(exc).grpc, public_message(exc))
        s = self.service.settings
        return pb.InfoResponse(
            model_id=info.model_id,
            model_revision=info.revision,
            backend=info.backend,
            device=info.device,
            dtype=info.dtype,
            attention=info.attention,
            max_length=info.max_length,
            max_batch_tokens=s.max_batch_tokens,
            max_batch_pairs=s.max_batch_pairs,
            max_documents=s.max_documents,
            max_queue_pairs=s.max_queue_pairs,
            accepts_instruction=info.accepts_instruction,
            server_version=__version__,
            default_fusion=fusion_to_proto(default_fusion),
        )
