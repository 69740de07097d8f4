"""The one settings object: every knob of the sidecar, read from RERANK_* env vars and `serve` flags.

Each field's description states its trade-off; the CLI builds its flags from these fields, so every
flag has an env twin (`--max-batch-tokens` <-> `RERANK_MAX_BATCH_TOKENS`) and the README table is
generated from the same source (`rerank-sidecar config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "RERANK_"
# The gRPC service name, also used as the health-check service name (Kubernetes probes name it).
SERVICE_NAME = "reranker.v1.RerankerService"
# What `auth_exempt` may name.
AUTH_EXEMPTABLE = ("health", "metrics", "info", "reflection")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # --- model -------------------------------------------------------------------------------
    model: str | None = Field(
        None,
        description="Model to serve: a local directory or a Hugging Face hub id. Unset serves the packaged "
        "all-MiniLM-L6-v2 embedding model (bi-encoder, works offline). A hub id is the only case that "
        "downloads anything.",
    )
    revision: str | None = Field(
        None,
        description="Hub revision (branch, tag or commit) when --model is a hub id; pins what is served.",
    )
    backend: Literal["auto", "cross-encoder", "bi-encoder", "causal-lm"] = Field(
        "auto",
        description="Scorer family. 'auto' reads the model directory: a sentence-transformers embedding "
        "model becomes a bi-encoder, a *ForCausalLM model an LLM reranker (causal-lm, docs/llm.md), anything "
        "else a cross-encoder.",
    )
    llm_family: Literal["auto", "erank", "qwen3-reranker", "mxbai-rerank-v2", "bge-reranker-v2-gemma"] = (
        Field(
            "auto",
            description="causal-lm only: the prompt template and scoring rule (docs/llm.md). 'auto' "
            "reads it from the model's name (ERank-4B -> erank) and refuses to guess otherwise: a "
            "reranker fed another family's prompt scores near random.",
        )
    )
    llm_max_new_tokens: int = Field(
        1024,
        ge=4,
        description="ERank only: most tokens the model may reason for before its answer; each counts in "
        "--max-batch-tokens like a prompt token. Lower is faster, but an answer cut off scores 0.0 (the "
        "card's vLLM example allows 4096).",
    )
    llm_forced_answer: bool = Field(
        False,
        description="ERank only: skip the reasoning: the prompt ends with an empty think block and "
        "'<answer>', and the digits are read from at most 6 generated tokens. Tens of times faster, but "
        "off the distribution the model was trained on; its agreement with full reasoning is unmeasured on "
        "real weights (docs/llm.md).",
    )
    llm_field_tokens: int = Field(
        2048,
        ge=1,
        description="ERank only: the query and the document are each cut to this many tokens, as in the "
        "model card's examples; the instruction never is. Longer keeps more text, costs more time.",
    )
    llm_engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto",
        description="ERank generation engine. 'auto' uses vLLM (continuous batching, prefix caching) on "
        "CUDA when the vllm package is installed, transformers elsewhere. The vLLM path is not tested in "
        "this project's CI.",
    )
    device: str = Field("auto", description="'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Inference precision. 'auto' on a CPU is the fastest runtime x precision that the "
        "model's quality-guard record passed (lost at most 0.005 nDCG@10 against torch float32, with 90% "
        "confidence; "
        "`rerank-sidecar guard`, docs/quality-guard.md), float32 when the model has no record; on CUDA "
        "it is bfloat16 (not guarded). Per runtime: docs/runtimes.md. bf16 keeps about 3 significant "
        "digits, int8 moves scores more; float32 matches sentence-transformers within 1e-4.",
    )
    quantize: Literal["none", "int8"] = Field(
        "none",
        description="CPU only: 'int8' runs the matrix products in int8. With --runtime torch the Linear "
        "layers are quantised dynamically (int8 weights, fp32 activations; 1.3x the fp32 baseline on an "
        "AVX2-only CPU, BENCHMARKS.md); openvino quantises statically with NNCF on --calibration-file, the "
        "rest at --dtype; onnxruntime dynamically after graph fusion (docs/runtimes.md). Faster, but scores "
        "move and close calls swap places, so check rankings on your data (`rerank-sidecar bench` and "
        "scripts/precision_agreement.py report agreement).",
    )
    runtime: Literal["auto", "torch", "openvino", "onnxruntime"] = Field(
        "auto",
        description="Inference runtime (docs/runtimes.md). 'torch' runs the model in PyTorch (any device). "
        "'openvino' and 'onnxruntime' (CPU only, the [cpu] extra) run a graph exported once into "
        "--export-cache-dir: faster on CPUs (OpenVINO bf16 about 2.5x, static int8 3-4x torch fp32 on an "
        "AVX512-BF16 CPU) at the cost of an export at first start and, below float32, scores that move. "
        "'auto' is what the quality guard picks with --dtype auto (see --dtype), torch otherwise. The "
        "precision follows --dtype and --quantize.",
    )
    cascade: str = Field(
        "auto",
        description="Cross-encoders on a CPU: score every document with a fast first pass, then re-score "
        "each request's top --cascade-depth documents (by the first pass) at the served precision, so the "
        "top of the ranking is the served precision's own. 'none' turns it off; RUNTIME/PRECISION names the "
        "first pass (openvino/int8, openvino/int8+bfloat16, openvino/bfloat16, openvino/float32, "
        "onnxruntime/int8, onnxruntime/float32); 'auto' follows the quality guard with --dtype auto (a "
        "cascade the guard passed and measured fastest) and is off otherwise (docs/runtimes.md, 'Cascade').",
    )
    cascade_depth: int = Field(
        20,
        ge=1,
        description="With a cascade: documents per request re-scored at the served precision. Requests with "
        "at most this many documents skip the first pass. 10 keeps the exact top-10 order of what the first "
        "pass puts there; more guards against the first pass missing a document the served precision ranks "
        "in the top 10, at the cost of speed.",
    )
    calibration_file: Path | None = Field(
        None,
        description='--quantize int8 with --runtime openvino: JSONL of {"query": ..., "document": ...} '
        "pairs whose activations set the static int8 ranges. Unset uses a built-in set of a few hundred "
        "varied English pairs; pairs like your own traffic (language, domain, lengths) keep int8 scores "
        "closer to float32, and a few hundred are enough (more only lengthen the export).",
    )
    export_cache_dir: Path = Field(
        Path("~/.cache/rerank-sidecar/exports"),
        description="Where OpenVINO / ONNX Runtime exports are kept, keyed by the model's content hash, "
        "runtime, quantisation, calibration set and library versions: a restart reuses them instead of "
        "exporting again (tens of seconds for a MiniLM-sized model). Costs about the model's size on disk "
        "per configuration; point it at a persistent volume in a container, or exports repeat at each start.",
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel. 'auto' uses flash-attn with unpadded (varlen) batches when it is "
        "installed and the device is CUDA, PyTorch SDPA otherwise.",
    )
    max_length: int | None = Field(
        None,
        ge=8,
        description="Tokens per (query, document) pair; longer pairs are truncated and reported as "
        "truncated. Unset uses the model's own limit. Lower is faster and loses document tail.",
    )
    long_documents: Literal["truncate", "windows"] = Field(
        "truncate",
        description="What to do with a (query, document) pair longer than max_length. 'truncate' scores "
        "the head of the document (one forward pass, the tail is never read). 'windows' splits the "
        "document into overlapping token windows that each fit with the query, scores every window and "
        "aggregates (window_aggregate), reporting the winning window's offsets: relevant text past the "
        "head is found, at the cost of one forward pass per window (up to max_windows_per_document).",
    )
    window_overlap_tokens: int = Field(
        32,
        ge=0,
        description="long_documents=windows: document tokens shared by consecutive windows. More overlap "
        "keeps a passage that straddles a cut whole in some window, but needs more windows to cover a "
        "document (cost); it is capped at half a window.",
    )
    max_windows_per_document: int = Field(
        8,
        ge=1,
        le=256,
        description="long_documents=windows: most windows scored per document (a request may ask for "
        "fewer with max_windows). Text past the last window is never read, so this also bounds memory "
        "and tokenizer work per document; each window is its own pair in the batcher's token budget, so "
        "a high cap lets one long document take a whole batch.",
    )
    window_aggregate: Literal["max", "first", "mean_top2"] = Field(
        "max",
        description="long_documents=windows: a document's score from its windows' scores. 'max' (the "
        "best passage) suits documents where one passage answers; 'first' scores the head like "
        "truncation but still reports windows; 'mean_top2' (mean of the two best) rewards documents "
        "relevant in more than one place and is less swayed by one lucky window.",
    )
    embedding_cache_bytes: int = Field(
        128 << 20,
        ge=0,
        description="Bi-encoders only: memory for document embeddings, most recent first, keyed by a hash "
        "of the text (an entry costs about 1.9 KB at 384 dimensions however long the document; 128 MiB "
        "holds about 70,000). Repeated documents then cost no forward pass; the bytes count against "
        "the container's memory limit. 0 disables it.",
    )
    score_cache_bytes: int = Field(
        64 << 20,
        ge=0,
        description="Memory for reranker scores, most recently used kept, keyed by the model, instruction, "
        "query, document text, max length and window settings (an entry costs at most 300 bytes however "
        "long the texts, 400 for a document split into windows; "
        "64 MiB holds about 220,000 pairs). A repeated (query, document) pair then costs no forward pass "
        "and gets the identical score; the bytes count against the container's memory limit, and a "
        "workload that never repeats a pair pays the hashing (microseconds per pair) for nothing. "
        "0 disables it; a request can bypass it (bypass_cache).",
    )
    embedding_cache_dir: str | None = Field(
        None,
        description="Bi-encoders only: a directory where document embeddings persist (SQLite, one file per "
        "model content hash, dtype and max length), so a restart or a second replay of the same corpus "
        "embeds no document twice. Costs about 1.6 KB of disk per document at 384 dimensions. Unset keeps "
        "them in memory only.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow model repositories to run their own Python code. Only for models you trust."
    )

    # --- network -----------------------------------------------------------------------------
    host: str = Field(
        "127.0.0.1",
        description="Address to bind. Loopback keeps the sidecar private to its pod; use 0.0.0.0 only for "
        "a shared reranker Service.",
    )
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    http_port: int = Field(
        8080, ge=0, le=65535, description="HTTP/JSON port (ml-commons connectors, /health, /metrics)."
    )
    metrics_port: int = Field(
        9090,
        ge=0,
        le=65535,
        description="Prometheus /metrics port; 0 picks a free one. Metrics are also served on the HTTP port.",
    )

    connection_timeout_s: float = Field(
        15.0,
        gt=0,
        description="A connection must deliver a complete request within this long after it opens (HTTP "
        "headers; the HTTP/2 handshake on gRPC) and, on HTTP, after each answer, or it is closed. Frees "
        "slow, header-only and idle connections; too low makes keep-alive clients reconnect more often.",
    )
    http_body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="How long an HTTP body may take to arrive once its headers have; slower bodies get "
        "408. Too low refuses clients on slow links.",
    )
    grpc_keepalive_s: float = Field(
        60.0,
        gt=0,
        description="The server pings each gRPC connection this often and drops it when no answer comes "
        "within 20 s (finds dead peers); clients pinging more often than this get GOAWAY. Lower finds "
        "dead peers sooner but costs pings and disconnects clients configured with a shorter keepalive.",
    )
    grpc_idle_timeout_s: float = Field(
        300.0,
        gt=0,
        description="A gRPC connection with no call for this long is closed (clients reconnect on their "
        "next call). Lower frees idle connections sooner; each reconnect costs one handshake.",
    )

    # --- transport security (README "TLS and auth") --------------------------------------------
    tls_cert_file: str | None = Field(
        None,
        description="PEM certificate (chain) of the server: with --tls-key-file, gRPC, HTTP and the metrics "
        "port speak TLS only. Protects queries and documents on the wire; costs a handshake per connection "
        "(keep-alive amortises it) and certificate rotation means a restart.",
    )
    tls_key_file: str | None = Field(
        None, description="PEM private key of --tls-cert-file. Keep it readable by the sidecar only."
    )
    tls_client_ca_file: str | None = Field(
        None,
        description="PEM CA bundle: when set (with --tls-cert-file), every client must present a "
        "certificate signed by it (mutual TLS) on gRPC, HTTP and the metrics port. Strong identity without "
        "shared secrets, but every client (search node, probes, Prometheus) then needs a certificate.",
    )
    auth_token: str | None = Field(
        None,
        description="Bearer token every gRPC call (`authorization: Bearer TOKEN` metadata) and HTTP request "
        "(Authorization header) must carry, compared in constant time; others get UNAUTHENTICATED / 401. "
        "Set it from the environment (a Kubernetes Secret): a flag shows in the process list. Without "
        "TLS the token crosses the network in clear text.",
    )
    auth_exempt: str = Field(
        "health,metrics",
        description="Comma-separated endpoints answered without the token: 'health' (grpc.health.v1 and "
        "HTTP /health, /healthz), 'metrics' (HTTP /metrics), 'info' (Info, /v1/info), 'reflection' (gRPC "
        "server reflection); '' exempts nothing. Probes and Prometheus rarely carry tokens; what is exempt "
        "is readable by anyone who reaches the port. The metrics port never checks the token.",
    )

    # --- batching ----------------------------------------------------------------------------
    max_batch_tokens: int = Field(
        8192,
        ge=64,
        description="Token budget of one forward pass: padded length x pairs, or the real tokens when "
        "the scorer packs batches without padding (CUDA + flash-attn, docs/gpu.md). Larger batches amortise "
        "overhead on GPUs (16384+ there); on CPU, beyond a few thousand tokens only latency grows.",
    )
    max_batch_pairs: int = Field(
        128, ge=1, description="Upper bound on pairs in one batch, whatever their length."
    )
    max_wait_ms: float = Field(
        2.0,
        ge=0,
        description="How long the batcher waits for more pairs before running a partial batch. Higher "
        "fills batches under light load at the cost of that much added latency.",
    )
    max_queue_pairs: int = Field(
        20000,
        ge=1,
        description="Bounded queue, in pairs. When a request would exceed it, it is refused at once with "
        "RESOURCE_EXHAUSTED / 429: a low limit refuses clients instead of making them wait. Must be at "
        "least max_documents (checked at start-up), so any valid request fits an idle queue.",
    )
    max_documents: int = Field(
        1000,
        ge=1,
        description="Most documents one request may carry; larger requests get INVALID_ARGUMENT. Requests "
        "below it are split internally, never refused for size.",
    )
    max_query_chars: int = Field(
        10000, ge=1, description="Longest accepted query, in characters (guards tokenizer time)."
    )
    max_body_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="Largest accepted request, in bytes: an HTTP body (413 beyond) or a gRPC message "
        "(INVALID_ARGUMENT beyond). A request in flight holds up to about 5x its size at peak, so 4 MiB "
        "lets 16 max-size requests run at once within the manifests' 2 Gi beside the model; it holds "
        "1,000 documents of 4 KB, more than a 512-token model reads of each.",
    )
    default_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Deadline for requests that carry none. Work past its deadline never reaches the model.",
    )
    fail_open: bool = Field(
        False,
        description='Default for requests that do not say (gRPC `fail_open`, HTTP `"fail_open"`): when '
        "nothing can be scored (queue full, model error, not ready or draining, deadline passed) answer OK "
        "with the documents in first-stage order, every hit marked FALLBACK with the reason (HTTP header "
        "x-rerank-fallback-reason), instead of an error. On, a search never fails because of the reranker "
        "but may silently get worse while it is down (watch reranker_fallback_total); off, the caller sees "
        "the error and chooses (retry, another replica, its own fallback).",
    )
    partial_results: bool = Field(
        False,
        description='Default for requests that do not say (gRPC `partial_results`, HTTP "partial_results"): '
        "when the deadline is about to pass, answer OK with every pair scored so far (RERANKED, ranked) and "
        "the unscored rest below them in first-stage order (FALLBACK, reason deadline), instead of "
        "DEADLINE_EXCEEDED / 504. Such requests are scored in first-stage order, not longest first, so the "
        "head of the list is scored first at the cost of more padding per batch (more inference time). On, "
        "a slow reranker degrades the ranking below the head instead of failing the search; off, the "
        "caller sees the error and chooses.",
    )
    partial_results_margin_ms: float = Field(
        100.0,
        ge=0,
        description="With partial results, how long before the deadline the partial answer is built and "
        "sent, so it reaches the client in time (it covers answering, the network, and the time before the "
        "server saw the request; a batch still in the model then is not waited for; 50 ms let answers "
        "arrive late on an overloaded 2-core host, 100 ms did not). Larger is safer against the client "
        "giving up first but scores fewer pairs; a margin at least the deadline's length answers with no "
        "pair scored.",
    )

    # --- score fusion (docs/fusion.md) --------------------------------------------------------
    fusion: Literal["auto", "none", "blend", "rrf", "erank_hybrid"] = Field(
        "auto",
        description="Default score fusion for requests that name none. 'none' ranks by the reranker "
        "score; 'blend' mixes normalised reranker and first-stage scores (needs first_stage_score on "
        "every document, else the request gets no fusion); 'rrf' is reciprocal-rank fusion (hit order "
        "when scores are absent); 'erank_hybrid' is ERank's z-score hybrid (needs first-stage scores like "
        "blend; --fusion-alpha is then the FIRST stage's weight, 0.2 in the paper). 'auto' reads fusion.json "
        "from a local model directory (the packaged model ships one: blend alpha 0.7 min-max, chosen on "
        "SciFact train queries), else 'none'.",
    )
    fusion_alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Blend weight of the reranker: 1 is pure reranker order, 0 pure first-stage order. "
        "Used when --fusion is 'blend'; with 'erank_hybrid' it weighs the first stage instead (the paper's "
        "convention).",
    )
    fusion_normalization: Literal["minmax", "zscore"] = Field(
        "minmax",
        description="How blend puts both scores on one scale, per request: 'minmax' maps to [0, 1] "
        "(bounded, but the top and bottom hit alone set the scale, so one outlier squeezes the rest); "
        "'zscore' is (x - mean) / std (every hit sets the scale; unbounded). Used when --fusion is 'blend'.",
    )
    fusion_rrf_k: int = Field(
        60,
        ge=1,
        description="RRF constant k in 1/(k + rank): small k lets the top ranks dominate, large k flattens "
        "the rank differences. Used when --fusion is 'rrf'.",
    )

    # --- lifecycle ---------------------------------------------------------------------------
    warmup: bool = Field(
        True,
        description="Run one batch before reporting SERVING, so the first real request does not pay "
        "for lazy initialisation.",
    )
    drain_seconds: float = Field(
        20.0,
        ge=0,
        description="On SIGTERM: health goes NOT_SERVING, new work is refused, and in-flight requests get "
        "this long to finish. Keep Kubernetes terminationGracePeriodSeconds above it.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        # A request of max_documents that the queue could never hold would be refused "retry later"
        # forever: refuse the configuration instead.
        if self.max_queue_pairs < self.max_documents:
            raise ValueError(
                f"max_queue_pairs ({self.max_queue_pairs}) is below max_documents ({self.max_documents}): a "
                "request of max_documents could never be queued; raise --max-queue-pairs or lower "
                "--max-documents"
            )
        if self.cascade not in ("auto", "none"):
            from sidecar.scoring.runtimes import CASCADE_FIRST_PASSES

            if self.cascade not in CASCADE_FIRST_PASSES:
                raise ValueError(
                    f"--cascade {self.cascade!r}: use auto, none or a first pass among "
                    f"{', '.join(CASCADE_FIRST_PASSES)}"
                )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("--tls-cert-file and --tls-key-file go together: set both for TLS, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "--tls-client-ca-file needs --tls-cert-file and --tls-key-file: mutual TLS is TLS first"
            )
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("--auth-token is empty: set a token, or unset it to turn the check off")
        unknown = self.exempt - set(AUTH_EXEMPTABLE)
        if unknown:
            raise ValueError(
                f"--auth-exempt names {', '.join(sorted(unknown))}: use a comma-separated subset of "
                f"{', '.join(AUTH_EXEMPTABLE)} (or '' for none)"
            )
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def exempt(self) -> set[str]:
        """The endpoints answered without the token (`auth_exempt` parsed)."""
        return {x.strip() for x in self.auth_exempt.split(",") if x.strip()}


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")
