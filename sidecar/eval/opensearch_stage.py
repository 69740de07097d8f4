"""OpenSearch as the first stage (BM25 `match` or `knn`) and as the rerank stage (a search pipeline).

The index is expected to hold one document per corpus entry with `_id` = the BEIR id and text fields `title`
and `text` (what the OpenSearch loader writes); document texts for the reranker come from the local corpus.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sidecar.eval.datasets import CorpusDoc
from sidecar.eval.first_stage import Hit
from sidecar.eval.rerankers import RerankOutput

DEFAULT_FIELDS = ("title", "text")


def connect(url: str, timeout: float = 60.0) -> Any:
    """An opensearch-py client; credentials and TLS options follow the OpenSearch tooling's environment."""
    from sidecar.opensearch.connection import ConnectionOptions

    return ConnectionOptions.from_env(url, timeout_s=timeout).connect()


def lexical_query(query: str, fields: Sequence[str]) -> dict[str, Any]:
    """BM25 over the text fields: `match` on one field, `multi_match` (best field per document) on several,
    the same shape the OpenSearch installer's example search uses, so a pipeline reranks this very list."""
    if len(fields) == 1:
        return {"match": {fields[0]: query}}
    return {"multi_match": {"query": query, "fields": list(fields)}}


class OpenSearchFirstStage:
    name = "opensearch"

    def __init__(
        self,
        url: str,
        index: str,
        *,
        mode: str = "match",
        fields: Sequence[str] = DEFAULT_FIELDS,
        knn_field: str = "embedding",
        query_encoder: Any = None,
        timeout: float = 60.0,
    ) -> None:
        if mode not in ("match", "knn"):
            raise ValueError(f"OpenSearch first stage is 'match' or 'knn', not {mode!r}")
        if mode == "knn" and query_encoder is None:
            raise ValueError("a knn first stage needs a query encoder (the dense model)")
        self.url, self.index, self.mode = url, index, mode
        self.fields = tuple(fields)
        self.knn_field = knn_field
        self.query_encoder = query_encoder
        self.client = connect(url, timeout)
        if not self.client.indices.exists(index=index):
            raise ValueError(f"OpenSearch index {index!r} does not exist at {url}: load the corpus first")

    def body(self, query: str, k: int) -> dict[str, Any]:
        if self.mode == "knn":
            vector = [float(x) for x in self.query_encoder(query)]
            return {
                "size": k,
                "_source": False,
                "query": {"knn": {self.knn_field: {"vector": vector, "k": k}}},
            }
        return {"size": k, "_source": False, "query": lexical_query(query, self.fields)}

    def search(self, query: str, k: int) -> list[Hit]:
        if not query.strip():
            return []
        response = self.client.search(index=self.index, body=self.body(query, k))
        return [Hit(str(h["_id"]), float(h["_score"])) for h in response["hits"]["hits"]]

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "opensearch", "url": self.url, "index": self.index, "query": self.mode}
        d.update({"knn_field": self.knn_field} if self.mode == "knn" else {"fields": list(self.fields)})
        return d

    def thread_exit(self) -> None:
        pass

    def close(self) -> None:
        self.client.close()


def sidecar_http_time(url: str) -> tuple[float, float]:
    """(requests, seconds) the sidecar at `url` (its HTTP base URL) has spent answering HTTP rerank calls,
    from its /metrics: `reranker_request_seconds{api="http"}` count and sum. The pipeline's calls reach the
    sidecar from inside the cluster, so this is the only view of the sidecar's own time on that path."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10) as reply:
        body = reply.read().decode()
    count = total = 0.0
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.labels.get("api") != "http":
                continue
            if sample.name == "reranker_request_seconds_count":
                count = sample.value
            elif sample.name == "reranker_request_seconds_sum":
                total = sample.value
    return count, total


class OpenSearchPipelineReranker:
    """Reranks inside the cluster: the same search, sent through a search pipeline (either path the installer
    makes: `rerank` with ml_opensearch, or ml_inference + rerank.by_field).

    The call's latency therefore includes the cluster's own first-stage search, as a user of the pipeline
    would see it; the cluster returns the top `depth` hits in the pipeline's order.
    """

    name = "opensearch-pipeline"

    def __init__(self, stage: OpenSearchFirstStage, pipeline: str, sidecar_url: str | None = None) -> None:
        self.stage = stage
        self.pipeline = pipeline
        # With the sidecar's URL, its /metrics before and after the replay give its own time per call.
        self.sidecar_url = sidecar_url
        self._sidecar_start = sidecar_http_time(sidecar_url) if sidecar_url else None

    def rerank(self, query: str, docs: Sequence[tuple[str, CorpusDoc, float]]) -> RerankOutput:
        body = self.stage.body(query, len(docs))
        # The processors read the document text from each hit's _source: with `_source: false` (what the
        # first stage asks for) the rerank path sees "" everywhere and silently keeps first-stage order.
        body["_source"] = {"excludes": [self.stage.knn_field]}
        # Each path reads its own ext entry and ignores the other's, so one body serves both pipelines.
        body["ext"] = {
            "rerank": {"query_context": {"query_text": query}},
            "ml_inference": {"query_text": query},
        }
        response = self.stage.client.search(
            index=self.stage.index, body=body, params={"search_pipeline": self.pipeline}
        )
        # No server time: the cluster's `took` covers the search phase only, not the response processors
        # (measured: p50 9 ms against 1.4 s for the whole call), so it is no measure of the rerank.
        return RerankOutput(ranking=[(str(h["_id"]), float(h["_score"])) for h in response["hits"]["hits"]])

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"api": "opensearch-pipeline", "pipeline": self.pipeline, "url": self.stage.url}
        if self.sidecar_url and self._sidecar_start is not None:
            count, total = sidecar_http_time(self.sidecar_url)
            calls = count - self._sidecar_start[0]
            d["sidecar_url"] = self.sidecar_url
            d["sidecar_calls"] = int(calls)  # warm-up queries included
            if calls > 0:
                d["sidecar_mean_ms"] = round(1000.0 * (total - self._sidecar_start[1]) / calls, 1)
        return d

    def close(self) -> None:
        pass
