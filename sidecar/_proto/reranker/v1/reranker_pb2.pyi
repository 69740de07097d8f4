from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FusionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUSION_METHOD_UNSPECIFIED: _ClassVar[FusionMethod]
    FUSION_METHOD_NONE: _ClassVar[FusionMethod]
    FUSION_METHOD_BLEND: _ClassVar[FusionMethod]
    FUSION_METHOD_RRF: _ClassVar[FusionMethod]
    FUSION_METHOD_ERANK_HYBRID: _ClassVar[FusionMethod]

class Normalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORMALIZATION_UNSPECIFIED: _ClassVar[Normalization]
    NORMALIZATION_MIN_MAX: _ClassVar[Normalization]
    NORMALIZATION_Z_SCORE: _ClassVar[Normalization]

class HitStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HIT_STATUS_UNSPECIFIED: _ClassVar[HitStatus]
    HIT_STATUS_RERANKED: _ClassVar[HitStatus]
    HIT_STATUS_FALLBACK: _ClassVar[HitStatus]
FUSION_METHOD_UNSPECIFIED: FusionMethod
FUSION_METHOD_NONE: FusionMethod
FUSION_METHOD_BLEND: FusionMethod
FUSION_METHOD_RRF: FusionMethod
FUSION_METHOD_ERANK_HYBRID: FusionMethod
NORMALIZATION_UNSPECIFIED: Normalization
NORMALIZATION_MIN_MAX: Normalization
NORMALIZATION_Z_SCORE: Normalization
HIT_STATUS_UNSPECIFIED: HitStatus
HIT_STATUS_RERANKED: HitStatus
HIT_STATUS_FALLBACK: HitStatus

class Document(_message.Message):
    __slots__ = ("id", "text", "title", "first_stage_score")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    FIRST_STAGE_SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    title: str
    first_stage_score: float
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., title: _Optional[str] = ..., first_stage_score: _Optional[float] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("query", "documents", "top_n", "instruction", "fusion", "partial_results", "fail_open", "bypass_cache", "max_windows")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_RESULTS_FIELD_NUMBER: _ClassVar[int]
    FAIL_OPEN_FIELD_NUMBER: _ClassVar[int]
    BYPASS_CACHE_FIELD_NUMBER: _ClassVar[int]
    MAX_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    top_n: int
    instruction: str
    fusion: Fusion
    partial_results: bool
    fail_open: bool
    bypass_cache: bool
    max_windows: int
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., top_n: _Optional[int] = ..., instruction: _Optional[str] = ..., fusion: _Optional[_Union[Fusion, _Mapping]] = ..., partial_results: _Optional[bool] = ..., fail_open: _Optional[bool] = ..., bypass_cache: _Optional[bool] = ..., max_windows: _Optional[int] = ...) -> None: ...

class Fusion(_message.Message):
    __slots__ = ("method", "alpha", "normalization", "rrf_k")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    RRF_K_FIELD_NUMBER: _ClassVar[int]
    method: FusionMethod
    alpha: float
    normalization: Normalization
    rrf_k: int
    def __init__(self, method: _Optional[_Union[FusionMethod, str]] = ..., alpha: _Optional[float] = ..., normalization: _Optional[_Union[Normalization, str]] = ..., rrf_k: _Optional[int] = ...) -> None: ...

class RankedDocument(_message.Message):
    __slots__ = ("index", "id", "score", "first_stage_score", "status", "fallback_reason", "truncated", "fused_score", "passage_start", "passage_end", "windows")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FIRST_STAGE_SCORE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    FUSED_SCORE_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_START_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_END_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    score: float
    first_stage_score: float
    status: HitStatus
    fallback_reason: str
    truncated: bool
    fused_score: float
    passage_start: int
    passage_end: int
    windows: int
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., score: _Optional[float] = ..., first_stage_score: _Optional[float] = ..., status: _Optional[_Union[HitStatus, str]] = ..., fallback_reason: _Optional[str] = ..., truncated: _Optional[bool] = ..., fused_score: _Optional[float] = ..., passage_start: _Optional[int] = ..., passage_end: _Optional[int] = ..., windows: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_seconds", "inference_seconds", "total_seconds", "batches")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    inference_seconds: float
    total_seconds: float
    batches: int
    def __init__(self, queue_seconds: _Optional[float] = ..., inference_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., batches: _Optional[int] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("results", "model_id", "model_revision", "timings", "fusion", "cached_pairs")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    CACHED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RankedDocument]
    model_id: str
    model_revision: str
    timings: Timings
    fusion: Fusion
    cached_pairs: int
    def __init__(self, results: _Optional[_Iterable[_Union[RankedDocument, _Mapping]]] = ..., model_id: _Optional[str] = ..., model_revision: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., fusion: _Optional[_Union[Fusion, _Mapping]] = ..., cached_pairs: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "model_revision", "backend", "device", "dtype", "attention", "max_length", "max_batch_tokens", "max_batch_pairs", "max_documents", "max_queue_pairs", "accepts_instruction", "server_version", "default_fusion", "max_body_bytes", "ready", "runtime", "cascade", "cascade_depth")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_PAIRS_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_PAIRS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FUSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BODY_BYTES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    CASCADE_FIELD_NUMBER: _ClassVar[int]
    CASCADE_DEPTH_FIELD_NUMBER: _ClassVar[int]
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
    accepts_instruction: bool
    server_version: str
    default_fusion: Fusion
    max_body_bytes: int
    ready: bool
    runtime: str
    cascade: str
    cascade_depth: int
    def __init__(self, model_id: _Optional[str] = ..., model_revision: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., attention: _Optional[str] = ..., max_length: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_batch_pairs: _Optional[int] = ..., max_documents: _Optional[int] = ..., max_queue_pairs: _Optional[int] = ..., accepts_instruction: _Optional[bool] = ..., server_version: _Optional[str] = ..., default_fusion: _Optional[_Union[Fusion, _Mapping]] = ..., max_body_bytes: _Optional[int] = ..., ready: _Optional[bool] = ..., runtime: _Optional[str] = ..., cascade: _Optional[str] = ..., cascade_depth: _Optional[int] = ...) -> None: ...
