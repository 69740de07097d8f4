"""The rerank stage as the evaluator sees it: one call per query to the sidecar over gRPC or HTTP/JSON.

Each call returns the candidates in the order the sidecar ranked them, with its ranking scores and, over gRPC,
the server's own timings (queue, inference) so client-side and server-side latency can be told apart. When the
sidecar fused the model's score with the first stage's, the same candidates ranked by the model's raw score
come back too, so one replay measures reranking with and without fusion.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from sidecar.eval.datasets import CorpusDoc

if TYPE_CHECKING:
    from sidecar.fusion import FusionSpec

# A candidate as the replay hands it over: (document id, document, first-stage score).
Candidate = tuple[str, CorpusDoc, float]


@dataclass
class RerankOutput:
    ranking: list[tuple[str, float]]
    server_queue_seconds: float | None = None
    server_inference_seconds: float | None = None
    server_total_seconds: float | None = None
    fallback_hits: int = 0
    truncated_hits: int = 0
    fallback_reasons: list[str] = field(default_factory=list)
    # The same candidates ranked by the model's raw score (ties keep first-stage order); set only when the
    # sidecar applied a fusion, so `ranking` (the fused order) and this differ by the fusion alone.
    unfused_ranking: list[tuple[str, float]] | None = None
    # The fusion the sidecar says it applied (`FusionSpec.to_dict()`); None when it did not say.
    fusion: dict[str, Any] | None = None

    @property
    def fused(self) -> bool:
        return self.fusion is not None and self.fusion.get("method") != "none"


def by_model_score(docs: Sequence[Candidate], raw: Sequence[tuple[int, float]]) -> list[tuple[str, float]]:
    """(candidate index, raw model score) per hit -> ranking by that score; ties keep first-stage order.

    The candidates are sent in first-stage order, so the index is the first-stage position; this is the
    order the sidecar itself returns with fusion `none`.
    """
    return [(docs[i][0], score) for i, score in sorted(raw, key=lambda x: (-x[1], x[0]))]


class Reranker(Protocol):
    name: str

    def rerank(self, query: str, docs: Sequence[Candidate]) -> RerankOutput: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class RerankError(Exception):
    """A rerank call failed; the replay keeps the first-stage order for that query and counts the failure."""


def _describe_fusion(d: dict[str, Any], fusion: FusionSpec | None) -> dict[str, Any]:
    if fusion is not None:  # absent: the request named none and the server's default applied
        d["fusion_requested"] = fusion.to_dict()
    return d


class GrpcReranker:
    """`fusion` is named in every request; None leaves the choice to the server's default."""

    name = "grpc"

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        fusion: FusionSpec | None = None,
        instruction: str | None = None,
    ) -> None:
        from sidecar.client import RerankerClient

        self.target = target
        self.timeout = timeout
        self.fusion = fusion
        self.instruction = instruction
        self.client = RerankerClient(target)

    def wait_ready(self, timeout: float = 120.0) -> None:
        self.client.wait_ready(timeout)

    def rerank(self, query: str, docs: Sequence[Candidate]) -> RerankOutput:
        import grpc

        from sidecar.types import Document, HitStatus

        documents = [
            Document(text=doc.text, id=doc_id, title=doc.title or None, first_stage_score=score)
            for doc_id, doc, score in docs
        ]
        try:
            result = self.client.rerank(
                query,
                documents,
                top_n=len(documents),
                instruction=self.instruction,
                timeout=self.timeout,
                fusion=self.fusion,
            )
        except grpc.RpcError as exc:
            raise RerankError(f"{exc.code().name}: {exc.details()}") from None  # type: ignore[attr-defined]
        fallback = [h for h in result.hits if h.status == HitStatus.FALLBACK]
        fusion = result.fusion.to_dict()
        return RerankOutput(
            # Map through `index`, not `id`: the index is what the contract guarantees to echo. The ranking
            # score is the fused one (the model's own without fusion): the order and its scores agree.
            ranking=[(docs[h.index][0], float(h.ranking_score)) for h in result.hits],
            server_queue_seconds=result.timings.queue_seconds,
            server_inference_seconds=result.timings.inference_seconds,
            server_total_seconds=result.timings.total_seconds,
            fallback_hits=len(fallback),
            truncated_hits=sum(1 for h in result.hits if h.truncated),
            fallback_reasons=sorted({h.fallback_reason for h in fallback if h.fallback_reason}),
            unfused_ranking=(
                by_model_score(docs, [(h.index, float(h.score)) for h in result.hits])
                if fusion["method"] != "none"
                else None
            ),
            fusion=fusion,
        )

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = _describe_fusion({"api": "grpc", "target": self.target}, self.fusion)
        if self.instruction:
            d["instruction"] = self.instruction
        try:
            info = self.client.info(timeout=5.0)
        except Exception as exc:  # the report still renders; the failure is recorded instead of the model
            d["info_error"] = str(exc)
            return d
        for key in (
            "model_id",
            "model_revision",
            "backend",
            "device",
            "dtype",
            "attention",
            "max_length",
            "max_batch_tokens",
            "max_documents",
            "server_version",
        ):
            d[key] = getattr(info, key, None)
        return d

    def close(self) -> None:
        self.client.close()


class HttpReranker:
    """`POST {url}/v1/rerank` with `{query, documents: [{id, text, title?, first_stage_score}], top_n,
    fusion?}`; answer `{results: [{index, relevance_score, rerank_score, ...}], fusion}` in rank order.

    `relevance_score` is the ranking (fused) score, `rerank_score` the model's; `fusion` is sent only when one
    is asked for, else the server's default applies.

    One keep-alive connection per replay thread: a fresh TCP connection per query would add its handshake to
    every measured rerank latency.
    """

    name = "http"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        path: str = "/v1/rerank",
        fusion: FusionSpec | None = None,
        instruction: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--http-url must be http(s)://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.path = (parts.path.rstrip("/") + path) if parts.path not in ("", "/") else path
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self.timeout = timeout
        self.fusion = fusion
        self.instruction = instruction
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._all_lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def _post(self, body: bytes) -> tuple[int, bytes]:
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request("POST", self.path, body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed an idle keep-alive connection; one retry on a fresh one is safe (rerank
                # is idempotent), a second failure is real.
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def rerank(self, query: str, docs: Sequence[Candidate]) -> RerankOutput:
        # Objects, not strings: only they carry the first-stage score that fusion needs. The sidecar reads
        # "title text", what `CorpusDoc.joined` (and gRPC's title + text) gives.
        documents = [
            {"id": doc_id, "text": doc.text, "title": doc.title or None, "first_stage_score": score}
            for doc_id, doc, score in docs
        ]
        request: dict[str, Any] = {"query": query, "documents": documents, "top_n": len(docs)}
        if self.fusion is not None:
            request["fusion"] = self.fusion.to_dict()
        if self.instruction:
            request["instruction"] = self.instruction
        try:
            status, payload = self._post(json.dumps(request).encode())
        except (OSError, http.client.HTTPException) as exc:
            raise RerankError(f"HTTP request failed: {exc}") from None
        if status != 200:
            raise RerankError(f"HTTP {status}: {payload[:300].decode(errors='replace')}")
        try:
            answer = json.loads(payload)
            results = answer["results"]
            ranking = [(docs[int(r["index"])][0], float(r["relevance_score"])) for r in results]
            fusion = answer.get("fusion")  # absent from a server predating fusion: it ranked by the model
            if fusion is not None and not isinstance(fusion, dict):
                raise TypeError(f"`fusion` is {type(fusion).__name__}, not an object")
            unfused = None
            if fusion is not None and fusion.get("method") != "none":
                unfused = by_model_score(docs, [(int(r["index"]), float(r["rerank_score"])) for r in results])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RerankError(
                f"unexpected HTTP response ({exc!r}): {payload[:300].decode(errors='replace')}"
            ) from None
        return RerankOutput(ranking=ranking, unfused_ranking=unfused, fusion=fusion)

    def describe(self) -> dict[str, Any]:
        return _describe_fusion({"api": "http", "url": self.url + self.path}, self.fusion)

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
