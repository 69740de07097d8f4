"""Python client for the sidecar's gRPC API (used by the CLI, the benchmark and the evaluator).

Thread-safe: one client (one channel) can be shared by many threads.
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar._proto.reranker.v1 import reranker_pb2_grpc as pb_grpc
from sidecar.fusion import NO_FUSION, FusionSpec
from sidecar.fusion_pb import fusion_from_proto, fusion_to_proto
from sidecar.security import ClientSecurity, grpc_channel
from sidecar.types import Document, HitStatus, RankedHit, RerankResult, Timings

_STATUS = {pb.HIT_STATUS_RERANKED: HitStatus.RERANKED, pb.HIT_STATUS_FALLBACK: HitStatus.FALLBACK}
# Large top-k requests exceed gRPC's 4 MB default.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


class RerankerClient:
    """`security` reaches a sidecar over TLS (CA file, client certificate) or with a token; the default
    is plain text."""

    def __init__(self, target: str = "127.0.0.1:50051", security: ClientSecurity | None = None) -> None:
        self.target = target
        self.channel = grpc_channel(target, security, _CHANNEL_OPTIONS)
        self._stub = pb_grpc.RerankerServiceStub(self.channel)

    def rerank(
        self,
        query: str,
        documents: Sequence[Document | str],
        top_n: int | None = None,
        instruction: str | None = None,
        timeout: float | None = 30.0,
        fusion: FusionSpec | None = None,
        fail_open: bool | None = None,
        bypass_cache: bool = False,
        partial_results: bool | None = None,
        max_windows: int | None = None,
    ) -> RerankResult:
        """Rerank `documents` for `query`; raises grpc.RpcError with the server's status on failure.

        `fusion` overrides the server's default score fusion for this request (docs/fusion.md). Hits come
        back ranked by `fused_score`; `score` stays the model's own. `fail_open` True asks for the documents
        in first-stage order, every hit FALLBACK with its `fallback_reason`, instead of an error when the
        sidecar cannot score; None uses the server's default. `bypass_cache` scores every pair with the
        model, neither reading nor writing the server's score cache. `partial_results` True asks, when the
        deadline comes first, for the pairs scored so far (RERANKED) and the rest below them in first-stage
        order (FALLBACK "deadline") instead of DEADLINE_EXCEEDED; None uses the server's default.
        model, neither reading nor writing the server's score cache. `max_windows` caps the windows scored
        per long document (servers with long_documents=windows; their own cap still applies).
        """
        request = pb.RerankRequest(
            query=query,
            top_n=top_n,
            instruction=instruction,
            fail_open=fail_open,
            partial_results=partial_results,
        )
        if bypass_cache:
            request.bypass_cache = True
        if max_windows is not None:
            request.max_windows = max_windows
        if fusion is not None:
            request.fusion.CopyFrom(fusion_to_proto(fusion))
        for doc in documents:
            d = Document(text=doc) if isinstance(doc, str) else doc
            request.documents.add(id=d.id, text=d.text, title=d.title, first_stage_score=d.first_stage_score)
        response = self._stub.Rerank(request, timeout=timeout)
        hits = [
            RankedHit(
                index=r.index,
                id=r.id,
                score=r.score,
                first_stage_score=r.first_stage_score if r.HasField("first_stage_score") else None,
                status=_STATUS.get(r.status, HitStatus.RERANKED),
                fallback_reason=r.fallback_reason,
                truncated=r.truncated,
                fused_score=r.fused_score if r.HasField("fused_score") else None,
                passage_start=r.passage_start if r.HasField("passage_start") else None,
                passage_end=r.passage_end if r.HasField("passage_end") else None,
                windows=r.windows,
            )
            for r in response.results
        ]
        t = response.timings
        timings = Timings(t.queue_seconds, t.inference_seconds, t.total_seconds, t.batches)
        # A server predating fusion sends no `fusion`: it ranked by the model's score.
        applied = fusion_from_proto(response.fusion) if response.HasField("fusion") else None
        return RerankResult(
            hits,
            response.model_id,
            response.model_revision,
            timings,
            fusion=applied or NO_FUSION,
            cached_pairs=response.cached_pairs,
        )

    def info(self, timeout: float | None = 10.0) -> pb.InfoResponse:
        return self._stub.Info(pb.InfoRequest(), timeout=timeout)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the server's health service reports SERVING (raises TimeoutError otherwise)."""
        from sidecar.health import wait_serving

        wait_serving(self.channel, timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RerankerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
