"""The rerank stage as the evaluator sees it: one call per query to the sidecar over gRPC or HTTP/JSON.

Each call returns the candidates in the order the sidecar ranked them, with its scores and, over gRPC, the
server's own timings (queue, inference) so client-side and server-side latency can be told apart.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from sidecar.eval.datasets import CorpusDoc

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


class Reranker(Protocol):
    name: str

    def rerank(self, query: str, docs: Sequence[Candidate]) -> RerankOutput: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class RerankError(Exception):
    """A rerank call failed; the replay keeps the first-stage order for that query and counts the failure."""


class GrpcReranker:
    name = "grpc"

    def __init__(self, target: str, *, timeout: float = 30.0) -> None:
        from sidecar.client import RerankerClient

        self.target = target
        self.timeout = timeout
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
            result = self.client.rerank(query, documents, top_n=len(documents), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise RerankError(f"{exc.code().name}: {exc.details()}") from None  # type: ignore[attr-defined]
        fallback = [h for h in result.hits if h.status == HitStatus.FALLBACK]
        return RerankOutput(
            # Map through `index`, not `id`: the index is what the contract guarantees to echo.
            ranking=[(docs[h.index][0], float(h.score)) for h in result.hits],
            server_queue_seconds=result.timings.queue_seconds,
            server_inference_seconds=result.timings.inference_seconds,
            server_total_seconds=result.timings.total_seconds,
            fallback_hits=len(fallback),
            truncated_hits=sum(1 for h in result.hits if h.truncated),
            fallback_reasons=sorted({h.fallback_reason for h in fallback if h.fallback_reason}),
        )

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"api": "grpc", "target": self.target}
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
    """`POST {url}/v1/rerank` with `{query, documents: [str], top_n}`; answer `{results: [{index,
    relevance_score}]}` in rank order.

    One keep-alive connection per replay thread: a fresh TCP connection per query would add its handshake to
    every measured rerank latency.
    """

    name = "http"

    def __init__(self, url: str, *, timeout: float = 30.0, path: str = "/v1/rerank") -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--http-url must be http(s)://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.path = (parts.path.rstrip("/") + path) if parts.path not in ("", "/") else path
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self.timeout = timeout
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
        body = json.dumps({"query": query, "documents": [d.joined() for _, d, _ in docs], "top_n": len(docs)})
        try:
            status, payload = self._post(body.encode())
        except (OSError, http.client.HTTPException) as exc:
            raise RerankError(f"HTTP request failed: {exc}") from None
        if status != 200:
            raise RerankError(f"HTTP {status}: {payload[:300].decode(errors='replace')}")
        try:
            results = json.loads(payload)["results"]
            ranking = [(docs[int(r["index"])][0], float(r["relevance_score"])) for r in results]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RerankError(
                f"unexpected HTTP response ({exc!r}): {payload[:300].decode(errors='replace')}"
            ) from None
        return RerankOutput(ranking=ranking)

    def describe(self) -> dict[str, Any]:
        return {"api": "http", "url": self.url + self.path}

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
