"""HTTP/JSON front end: translates JSON bodies to `RerankQuery` and results back; computes nothing.

Served on the same event loop, service and batcher as gRPC, so OpenSearch connectors, Cohere-style
clients and gRPC clients share batches. One request shape, three answer shapes (see
sidecar.opensearch.mlcommons for the ml-commons facts behind them):

  POST /v1/rerank, /v2/rerank  {"results": [{"index", "relevance_score"}], ...}
      for Cohere clients and connector.post_process.cohere.rerank
  POST /v1/opensearch/rerank   [{"index", "relevance_score"}, ...]
      for connector.post_process.default.rerank
  POST /v1/opensearch/scores   {"scores": [one float per document, in input order]}
      for ml_inference + rerank.by_field

Request: {"query": str, "documents": [str | {"text", "title"?, "id"?, "first_stage_score"?} | [str, ...]],
"top_n"?: int, "instruction"?: str, "return_documents"?: bool, "fusion"?: "none" | "blend" | "rrf" |
{"method", "alpha"?, "normalization"?, "rrf_k"?}, "fail_open"?: bool, "bypass_cache"?: bool (score with the
model, neither reading nor writing the score cache), "partial_results"?: bool, "max_windows"?: int (long
documents: most windows per document, capped by the server's max_windows_per_document)}. Unknown top-level
fields are ignored (Cohere clients send `model`). Every shape's score is the ranking score (fused when
fusion applies, docs/fusion.md); the Cohere shape also carries the raw `rerank_score`, the
`first_stage_score`, the applied `fusion` and, for a document split into windows (setting
long_documents=windows), `windows` and the winning window's `passage_start` / `passage_end` (character
offsets into the document's text), and every answer names the fusion in the `x-rerank-fusion` header and
the pairs answered from the score cache in `x-rerank-cached`. The `x-rerank-timeout-ms` header sets the
deadline. A fail-open answer (`"fail_open": true`, README "Fail-open") is a 200 in the same shape,
first-stage order, every hit with `fallback_reason`, scores n..1 (descending, so OpenSearch keeps that
order), headers `x-rerank-fallback` (how many hits fell back) and `x-rerank-fallback-reason`. A partial
answer (`"partial_results": true`, README "Partial results") is a 200 in the same shape: the scored hits
first, then the unscored ones with `fallback_reason` "deadline" in first-stage order, their scores below
every scored hit's (so OpenSearch keeps that order), with the same two headers; a request whose documents
were split into windows is answered whole.
GET /health (/healthz), /metrics, /v1/info.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sidecar.errors import (
    InternalError,
    InvalidInput,
    InvalidSchema,
    PayloadTooLarge,
    RerankError,
    SlowBody,
    Unauthenticated,
    UnsupportedMediaType,
    json_type_name,
    public_message,
    status_of,
)
from sidecar.fusion import FusionSpec
from sidecar.metrics import Metrics
from sidecar.opensearch import mlcommons
from sidecar.security import bearer_ok
from sidecar.service import RerankService
from sidecar.settings import Settings
from sidecar.types import Document, HitStatus, RankedHit, RerankQuery, RerankResult

log = logging.getLogger(__name__)

API = "http"
JSON_TYPE = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ---- request translation ----------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(body: bytes) -> Any:
    """Bytes -> JSON value; InvalidInput (400) for non-UTF-8, malformed JSON, NaN/Infinity, deep nesting."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"the body is not valid UTF-8 (byte {exc.start}): send UTF-8 encoded JSON"
        ) from exc
    if not text.strip():
        raise InvalidInput("the body is empty: send a JSON object with `query` and `documents`")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except ValueError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidInput("malformed JSON: nested too deeply") from exc


def _unicode(value: str, where: str) -> str:
    # JSON can spell lone surrogates (\ud800) that no tokenizer accepts: refuse them here, not with a 500.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{where} holds an unpaired surrogate (\\u{ord(value[exc.start]):04x})") from exc
    return value


def _document(i: int, raw: Any) -> Document:
    if isinstance(raw, str):
        return Document(text=_unicode(raw, f"documents[{i}]"))
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        # A multi-valued field, as ml_inference sends it; joined like neural-search joins list values.
        return Document(text=_unicode(" ".join(raw), f"documents[{i}]"))
    if isinstance(raw, dict):
        text = raw.get("text")
        if not isinstance(text, str):
            raise InvalidSchema(f"documents[{i}].text must be a string, got {json_type_name(text)}")
        title = raw.get("title")
        if title is not None and not isinstance(title, str):
            raise InvalidSchema(f"documents[{i}].title must be a string or null, got {json_type_name(title)}")
        doc_id = raw.get("id", "")
        if not isinstance(doc_id, str | int) or isinstance(doc_id, bool):
            raise InvalidSchema(f"documents[{i}].id must be a string, got {json_type_name(doc_id)}")
        first_stage = raw.get("first_stage_score")
        if first_stage is not None and (
            isinstance(first_stage, bool) or not isinstance(first_stage, int | float)
        ):
            got = json_type_name(first_stage)
            raise InvalidSchema(f"documents[{i}].first_stage_score must be a number or null, got {got}")
        return Document(
            text=_unicode(text, f"documents[{i}].text"),
            title=_unicode(title, f"documents[{i}].title") if title else None,
            id=_unicode(str(doc_id), f"documents[{i}].id"),
            first_stage_score=None if first_stage is None else _as_float(first_stage),
        )
    raise InvalidSchema(
        f"documents[{i}] must be a string or an object with `text`, got {json_type_name(raw)}"
    )


def _as_float(value: float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer literal beyond double range; the service refuses non-finite scores
        return math.inf


def parse_request(obj: Any, deadline: float | None, all_documents: bool = False) -> tuple[RerankQuery, bool]:
    """JSON value -> (RerankQuery, return_documents); InvalidSchema (422) for missing or mistyped fields."""
    if not isinstance(obj, dict):
        raise InvalidSchema(f"the body must be a JSON object, got {json_type_name(obj)}")
    if "query" not in obj:
        raise InvalidSchema("missing field `query`: the search text to rerank against")
    query = obj["query"]
    if not isinstance(query, str):
        raise InvalidSchema(f"`query` must be a string, got {json_type_name(query)}")
    _unicode(query, "`query`")
    if "documents" not in obj:
        raise InvalidSchema("missing field `documents`: an array of strings or objects with `text`")
    raw_docs = obj["documents"]
    if not isinstance(raw_docs, list):
        raise InvalidSchema(f"`documents` must be an array, got {json_type_name(raw_docs)}")
    documents = [_document(i, d) for i, d in enumerate(raw_docs)]
    top_n = obj.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
        raise InvalidSchema(f"`top_n` must be a non-negative integer, got {top_n!r}")
    # 0 or absent means all; the service applies the rest of the rule (more than there are means all).
    top_n = None if all_documents or not top_n else top_n
    instruction = obj.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise InvalidSchema(f"`instruction` must be a string, got {json_type_name(instruction)}")
    if instruction:
        _unicode(instruction, "`instruction`")
    return_documents = obj.get("return_documents", False)
    if not isinstance(return_documents, bool):
        raise InvalidSchema(f"`return_documents` must be a boolean, got {json_type_name(return_documents)}")
    fusion = obj.get("fusion")
    fail_open = obj.get("fail_open")
    if fail_open is not None and not isinstance(fail_open, bool):
        raise InvalidSchema(f"`fail_open` must be a boolean, got {json_type_name(fail_open)}")
    partial_results = obj.get("partial_results")
    if partial_results is not None and not isinstance(partial_results, bool):
        raise InvalidSchema(f"`partial_results` must be a boolean, got {json_type_name(partial_results)}")
    bypass_cache = obj.get("bypass_cache", False)
    if not isinstance(bypass_cache, bool):
        raise InvalidSchema(f"`bypass_cache` must be a boolean, got {json_type_name(bypass_cache)}")
    max_windows = obj.get("max_windows")
    if max_windows is not None and (
        isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1
    ):
        raise InvalidSchema(f"`max_windows` must be a positive integer, got {max_windows!r}")
    q = RerankQuery(
        query=query,
        documents=documents,
        top_n=top_n,
        instruction=instruction or None,
        deadline=deadline,
        fusion=None if fusion is None else FusionSpec.parse(fusion),
        fail_open=fail_open,
        bypass_cache=bypass_cache,
        partial_results=partial_results,
        max_windows=max_windows,
    )
    return q, return_documents


def parse_deadline(request: web.Request) -> float | None:
    raw = request.headers.get(mlcommons.TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = float("nan")
    if not ms > 0 or ms == float("inf"):
        raise InvalidInput(f"header {mlcommons.TIMEOUT_HEADER} must be a positive number of milliseconds")
    return asyncio.get_running_loop().time() + ms / 1000.0


# ---- response translation ---------------------------------------------------------------------
def _entry(hit: RankedHit) -> dict[str, Any]:
    # OpenSearch orders hits by relevance_score, so it is the ranking (fused) score.
    entry: dict[str, Any] = {"index": hit.index, "relevance_score": mlcommons.encode_score(hit.ranking_score)}
    if hit.status is not HitStatus.RERANKED:
        entry["fallback_reason"] = hit.fallback_reason or hit.status.value
    return entry


def cohere_body(result: RerankResult, q: RerankQuery, return_documents: bool) -> dict[str, Any]:
    results = []
    for hit in result.hits:
        entry = _entry(hit)
        entry["rerank_score"] = mlcommons.encode_score(hit.score)
        if hit.first_stage_score is not None:
            entry["first_stage_score"] = hit.first_stage_score
        entry["fused_score"] = entry["relevance_score"]
        if hit.passage_start is not None:
            entry["windows"] = hit.windows
            entry["passage_start"] = hit.passage_start
            entry["passage_end"] = hit.passage_end
        if return_documents:
            entry["document"] = {"text": q.documents[hit.index].text}
        results.append(entry)
    return {
        "id": str(uuid.uuid4()),
        "results": results,
        "model": result.model_id,
        "fusion": result.fusion.to_dict(),
    }


def list_body(result: RerankResult) -> list[dict[str, Any]]:
    return [_entry(hit) for hit in result.hits]


def scores_body(result: RerankResult, n: int) -> dict[str, Any]:
    scores: list[float | None] = [None] * n
    for hit in result.hits:
        scores[hit.index] = mlcommons.encode_score(hit.ranking_score)
    if any(s is None for s in scores):
        raise InternalError(f"the service returned {len(result.hits)} hits for {n} documents")
    return {"scores": scores}


def _headers(result: RerankResult) -> dict[str, str]:
    headers = {
        "x-rerank-model": result.model_id.encode("ascii", "replace").decode("ascii"),
        "x-rerank-fusion": result.fusion.describe(),
    }
    fallback = sum(h.status is not HitStatus.RERANKED for h in result.hits)
    if fallback:
        headers["x-rerank-fallback"] = str(fallback)
        reasons = sorted({h.fallback_reason for h in result.hits if h.fallback_reason})
        if reasons:
            headers["x-rerank-fallback-reason"] = ",".join(reasons)
    truncated = sum(h.truncated for h in result.hits)
    if truncated:
        headers["x-rerank-truncated"] = str(truncated)
    headers["x-rerank-cached"] = str(result.cached_pairs)
    return headers


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return web.Response(text=text, status=status, content_type=JSON_TYPE, charset="utf-8", headers=headers)


def error_response(err: BaseException) -> web.Response:
    status = status_of(err)
    code = err.code if isinstance(err, RerankError) and not isinstance(err, InternalError) else "internal"
    body = {"error": {"code": code, "message": public_message(err), "status": status.http}}
    # RFC 6750: a 401 names the scheme it wants.
    headers = None
    if isinstance(err, Unauthenticated):
        headers = {"WWW-Authenticate": 'Bearer realm="rerank-sidecar"'}
    return json_response(body, status=status.http, headers=headers)


# ---- the app ----------------------------------------------------------------------------------
class HttpApi:
    def __init__(self, service: RerankService, metrics: Metrics, settings: Settings) -> None:
        self.service = service
        self.metrics = metrics
        self.max_body_bytes = settings.max_body_bytes
        self.body_timeout_s = settings.http_body_timeout_s

    async def _read(self, request: web.Request) -> bytes:
        if request.content_type != JSON_TYPE:
            got = request.headers.get("Content-Type") or "none"
            raise UnsupportedMediaType(
                f"Content-Type must be {JSON_TYPE}, got {got}: send the body as JSON "
                f"(curl: -H 'content-type: {JSON_TYPE}')"
            )
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise PayloadTooLarge(self._too_large(request.content_length))
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise PayloadTooLarge(self._too_large(None)) from exc
        except TimeoutError as exc:
            raise SlowBody(
                f"the body did not arrive within {self.body_timeout_s:g}s of its headers "
                "(the operator can raise RERANK_HTTP_BODY_TIMEOUT_S)"
            ) from exc

    def _too_large(self, size: int | None) -> str:
        got = f"{size} bytes" if size is not None else "the body"
        return (
            f"{got} exceed the limit of {self.max_body_bytes} bytes: send fewer or shorter documents "
            "(the operator can raise RERANK_MAX_BODY_BYTES)"
        )

    def _endpoint(self, shape: str) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            with self.service.counting_refusals(API):
                body = await self.service.receive(self._read(request))
                deadline = parse_deadline(request)
                q, return_documents = parse_request(
                    decode_json(body), deadline, all_documents=shape == "scores"
                )
            result = await self.service.rerank(q, API)
            if shape == "cohere":
                payload: Any = cohere_body(result, q, return_documents)
            elif shape == "list":
                payload = list_body(result)
            else:
                payload = scores_body(result, len(q.documents))
            return json_response(payload, headers=_headers(result))

        return handle

    async def health(self, request: web.Request) -> web.Response:
        ready = self.service.ready
        return json_response({"status": "SERVING" if ready else "NOT_SERVING"}, status=200 if ready else 503)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def info(self, request: web.Request) -> web.Response:
        info = self.service.info()
        return json_response({**dataclasses.asdict(info), "default_fusion": info.default_fusion.to_dict()})


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place the HTTP front end turns exceptions into statuses (sidecar.errors' table); handlers
    raise, never build error answers. Every error leaves as JSON: routing errors keep their status,
    anything unexpected is a generic 500 with its traceback in the log."""
    try:
        return await handler(request)
    except RerankError as err:
        return error_response(err)
    except web.HTTPRequestEntityTooLarge:
        return error_response(PayloadTooLarge("the body exceeds the configured size limit"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = {
            "error": {
                "code": exc.reason.lower().replace(" ", "_"),
                "message": exc.reason,
                "status": exc.status,
            }
        }
        return json_response(
            body, status=exc.status, headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(exc)


async def _no_version_banner(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp would announce "Python/3.x aiohttp/3.y": versions help only those looking for holes.
    response.headers["Server"] = "rerank-sidecar"


# What each `auth_exempt` name opens on HTTP.
HTTP_EXEMPT = {
    "health": ("/health", "/healthz"),
    "metrics": ("/metrics",),
    "info": ("/v1/info",),
    "reflection": (),  # gRPC only
}


Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def _bearer_required(token: str, exempt: set[str], metrics: Metrics) -> Middleware:
    open_paths = frozenset(path for name in exempt for path in HTTP_EXEMPT[name])

    @web.middleware
    async def authenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization")
        if request.path not in open_paths and not bearer_ok(header, token):
            metrics.auth_refused.labels(API).inc()
            raise Unauthenticated.for_header(header)  # answered by _json_errors, before the body is read
        return await handler(request)

    return authenticated


def create_app(service: RerankService, metrics: Metrics, settings: Settings) -> web.Application:
    api = HttpApi(service, metrics, settings)
    middlewares: list[Any] = [_json_errors]
    if settings.auth_token is not None:
        middlewares.append(_bearer_required(settings.auth_token, settings.exempt, metrics))
    # client_max_size also bounds chunked bodies, which carry no Content-Length to check up front.
    app = web.Application(client_max_size=api.max_body_bytes, middlewares=middlewares)
    app.on_response_prepare.append(_no_version_banner)
    for path, shape in (
        (mlcommons.PATH_COHERE, "cohere"),
        ("/v2/rerank", "cohere"),
        (mlcommons.PATH_LIST, "list"),
        (mlcommons.PATH_SCORES, "scores"),
    ):
        app.router.add_post(path, api._endpoint(shape))
    app.router.add_get("/health", api.health)
    app.router.add_get("/healthz", api.health)
    app.router.add_get("/metrics", api.metrics_endpoint)
    app.router.add_get("/v1/info", api.info)
    return app
