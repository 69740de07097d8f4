"""Internal request/response types shared by the front ends, the service and the batcher.

Front ends translate wire formats (protobuf, JSON) to and from these; nothing below them sees a wire type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from sidecar.fusion import NO_FUSION, FusionSpec


@dataclass(frozen=True)
class Document:
    text: str
    id: str = ""
    title: str | None = None
    first_stage_score: float | None = None

    def model_text(self) -> str:
        """What the model reads: 'title text' when a title is set."""
        return f"{self.title} {self.text}" if self.title else self.text


@dataclass(frozen=True)
class RerankQuery:
    query: str
    documents: list[Document]
    top_n: int | None = None
    instruction: str | None = None
    # Absolute deadline on the event loop's clock (loop.time()); None uses the server default.
    deadline: float | None = None
    # Score fusion for this request; None uses the server's default.
    fusion: FusionSpec | None = None
    # Answer in first-stage order, every hit FALLBACK, instead of an error when nothing can be scored;
    # None uses the server's default (settings.fail_open).
    fail_open: bool | None = None
    # Score every pair with the model, neither reading nor writing the score cache.
    bypass_cache: bool = False
    # At the deadline answer with the pairs scored so far, the rest FALLBACK "deadline" in first-stage
    # order below them, instead of an error; None uses the server's default (settings.partial_results).
    partial_results: bool | None = None
    # Long documents (settings.long_documents=windows): most windows per document, capped by the server's
    # max_windows_per_document; None uses that.
    max_windows: int | None = None


class HitStatus(Enum):
    RERANKED = "reranked"
    FALLBACK = "fallback"


@dataclass(frozen=True)
class RankedHit:
    index: int
    id: str
    score: float  # the model's (reranker's) raw score, whatever the fusion
    first_stage_score: float | None
    status: HitStatus = HitStatus.RERANKED
    fallback_reason: str = ""
    truncated: bool = False
    # The score hits are ranked by: `score` fused with the first stage (equal to `score` without fusion).
    # None only where a server predating fusion sent none.
    fused_score: float | None = None
    # Long documents split into windows: the winning window's character offsets into `Document.text`
    # (None when the document was scored whole or truncated) and the number of windows scored.
    passage_start: int | None = None
    passage_end: int | None = None
    windows: int = 1

    @property
    def ranking_score(self) -> float:
        return self.score if self.fused_score is None else self.fused_score


@dataclass(frozen=True)
class Timings:
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    total_seconds: float = 0.0
    batches: int = 0


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    revision: str
    backend: str
    device: str
    dtype: str
    attention: str
    max_length: int
    accepts_instruction: bool
    # The inference runtime: "torch", "openvino" or "onnxruntime" (sidecar/scoring/runtimes.py).
    runtime: str = "torch"
    # The cascade's first pass (RUNTIME/PRECISION, "" when none) and how many documents per request the
    # served precision re-scores after it (settings.cascade, docs/runtimes.md).
    cascade: str = ""
    cascade_depth: int = 0


@dataclass(frozen=True)
class ServiceInfo:
    """What `Info` reports, built once by the service; each front end only translates it (field names are
    the proto's and the JSON's)."""

    model_id: str
    model_revision: str
    backend: str
    device: str
    dtype: str
    attention: str
    max_length: int
    max_batch_tokens: int
    max_batch_pairs: int
    max_documents: int
    max_queue_pairs: int
    max_body_bytes: int
    accepts_instruction: bool
    server_version: str
    default_fusion: FusionSpec
    ready: bool
    runtime: str
    cascade: str = ""
    cascade_depth: int = 0


@dataclass(frozen=True)
class RerankResult:
    hits: list[RankedHit]
    model_id: str
    model_revision: str
    timings: Timings = field(default_factory=Timings)
    # The fusion applied: the request's, the server default's, or none when the default could not apply.
    fusion: FusionSpec = NO_FUSION
    # Pairs answered from the score cache (no forward pass).
    cached_pairs: int = 0
