"""Prometheus metrics by stage, one prefix (`reranker_`), unit in the name, few labels.

Each server owns its registry (tests run several servers in one process).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_PAIRS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "reranker_requests", "Rerank requests by API and outcome.", ["api", "outcome"], registry=r
        )
        self.request_seconds = Histogram(
            "reranker_request_seconds",
            "End-to-end request time in the server.",
            ["api"],
            buckets=_SECONDS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "reranker_queue_seconds",
            "Time a request waited before its first batch started.",
            buckets=_SECONDS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "reranker_inference_seconds", "Forward-pass time of one batch.", buckets=_SECONDS, registry=r
        )
        self.tokenize_seconds = Histogram(
            "reranker_tokenize_seconds",
            "Time to measure (tokenise) a request's pairs.",
            buckets=_SECONDS,
            registry=r,
        )
        self.batch_pairs = Histogram("reranker_batch_pairs", "Pairs per batch.", buckets=_PAIRS, registry=r)
        self.batch_tokens = Histogram(
            "reranker_batch_tokens",
            "Padded tokens per batch (longest pair x pairs).",
            buckets=_TOKENS,
            registry=r,
        )
        self.batch_real_tokens = Histogram(
            "reranker_batch_real_tokens", "Unpadded tokens per batch.", buckets=_TOKENS, registry=r
        )
        self.batch_requests = Histogram(
            "reranker_batch_requests", "Distinct requests sharing one batch.", buckets=_PAIRS, registry=r
        )
        self.queue_pairs = Gauge("reranker_queue_pairs", "Pairs waiting in the batcher queue.", registry=r)
        self.pairs_scored = Counter("reranker_pairs_scored", "Pairs scored by the model.", registry=r)
        self.pairs_dropped = Counter(
            "reranker_pairs_dropped",
            "Pairs removed before scoring because their request expired or was cancelled.",
            ["reason"],
            registry=r,
        )
        self.truncated = Counter(
            "reranker_documents_truncated", "Pairs truncated to the model's max length.", registry=r
        )
        self.windows = Counter(
            "reranker_document_windows",
            "Windows scored for documents split because they exceed the model's max length "
            "(long_documents=windows).",
            registry=r,
        )
        self.fusion_requests = Counter(
            "reranker_fusion_requests",
            "Answered rerank requests by the score fusion applied (none, blend, rrf).",
            ["method"],
            registry=r,
        )
        self.fusion_skipped = Counter(
            "reranker_fusion_skipped",
            "Requests where the server's default fusion could not apply and none was used instead.",
            ["reason"],
            registry=r,
        )
        self.score_cache_hits = Counter(
            "reranker_score_cache_hits", "Pairs answered from the score cache (no forward pass).", registry=r
        )
        self.score_cache_misses = Counter(
            "reranker_score_cache_misses",
            "Pairs looked up in the score cache and not found (sent to the model).",
            registry=r,
        )
        self.score_cache_evictions = Counter(
            "reranker_score_cache_evictions",
            "Score cache entries dropped, least recently used first, to stay within score_cache_bytes.",
            registry=r,
        )
        self.score_cache_bytes = Gauge(
            "reranker_score_cache_bytes", "Bytes the score cache holds (estimated per entry).", registry=r
        )
        self.auth_refused = Counter(
            "reranker_auth_refused",
            "Calls refused for a missing or wrong bearer token (never counted as requests).",
            ["api"],
            registry=r,
        )
        self.fallbacks = Counter(
            "reranker_fallback",
            "Requests answered with FALLBACK hits, by reason: in first-stage order because nothing could be "
            "scored (fail-open), or with the unscored part of a partial answer (reason deadline).",
            ["reason"],
            registry=r,
        )
        self.partial_answers = Counter(
            "reranker_partial_answers",
            "Requests answered at their deadline with part of their pairs scored (partial results).",
            registry=r,
        )
        self.partial_fallback_hits = Counter(
            "reranker_partial_fallback_hits",
            "Hits of partial answers left unscored at the deadline (FALLBACK, reason deadline).",
            registry=r,
        )
        self.ready = Gauge("reranker_ready", "1 when serving, 0 when loading or draining.", registry=r)
        self.model_info = Gauge(
            "reranker_model_info",
            "The served model (value is always 1).",
            ["model", "revision", "backend", "device", "dtype"],
            registry=r,
        )
        self.runtime_info = Gauge(
            "reranker_runtime_info",
            "The inference runtime (torch, openvino, onnxruntime) and its precision (value is always 1).",
            ["runtime", "precision"],
            registry=r,
        )
        self.cascade_info = Gauge(
            "reranker_cascade_info",
            "The cascade's first pass (RUNTIME/PRECISION) and re-scored depth; absent without a cascade "
            "(value is always 1).",
            ["first_pass", "depth"],
            registry=r,
        )
        self.cascade_requests = Counter(
            "reranker_cascade_requests_total",
            "Requests through a cascade: 'rescored' (first pass, then the top re-scored), 'direct' (no more "
            "documents than the depth: the served precision alone), 'first_pass_only' (the deadline came "
            "during the re-score and partial results allowed the first pass's ranking).",
            ["outcome"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
