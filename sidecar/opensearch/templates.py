"""The OpenSearch request bodies that wire the sidecar in: cluster settings, connectors, model, pipelines.

One source for the installer, `rerank-sidecar opensearch render` and the files in opensearch_plugin_config/
(a test re-renders those files and fails on drift). Two integration paths:

- "rerank": the neural-search `rerank` response processor with `ml_opensearch`, calling a remote model
  whose connector uses the built-in rerank pre/post-process functions.
- "by_field": an `ml_inference` response processor (scores in input order) followed by `rerank.by_field`
  with `keep_previous_score`, so the first-stage score stays next to the new one.

Both can rerank a deeper window than the page: `oversample` multiplies `size` before the search and
`truncate_hits` cuts back to the requested size after reranking.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import urlsplit

from sidecar.opensearch import mlcommons

Kind = Literal["rerank", "by_field"]
KINDS: tuple[Kind, ...] = ("rerank", "by_field")
MANAGED_BY = "managed by rerank-sidecar"
MIN_VERSION = (2, 19, 0)
# `rerank.by_field.previous_score_field` exists from neural-search 3.8 (ByFieldRerankProcessor).
PREVIOUS_SCORE_FIELD_VERSION = (3, 8, 0)

# ml-commons copies these settings into a remote model at deploy time from these versions on.
PRIVATE_IP_COPIED_VERSION = (3, 4, 0)
REGEX_COPIED_VERSION = (3, 8, 0)

# neural-search's DocumentContextSourceFetcher reads only top-level _source keys up to 3.5.
DOTTED_FIELDS_VERSION = (3, 6, 0)

# The one credential entry every connector carries (see connector_body).
CREDENTIAL_KEY = "sidecar_token"

# Placeholders in rendered files; the installer substitutes real ids.
CONNECTOR_ID = "<connector_id>"
MODEL_ID = "<model_id>"
MODEL_GROUP_ID = "<model_group_id>"


class UnsupportedVersion(ValueError):
    pass


@dataclass(frozen=True)
class PluginConfig:
    """Everything the rendered bodies depend on. Timeouts are whole seconds: ml-commons reads them with
    `Duration.ofSeconds` (HttpJsonConnectorExecutor), and its defaults were 30000 s before 3.6."""

    sidecar_url: str = "http://127.0.0.1:8080"
    fields: tuple[str, ...] = ("title", "text")
    opensearch_version: str = "3.0.0"
    name: str = "rerank-sidecar"
    connection_timeout_s: int = 2
    read_timeout_s: int = 5
    max_connection: int = 32
    # ml-commons retries 429 and 5xx when > 0; a retried rerank usually costs more than it saves.
    max_retry_times: int = 0
    # Which built-in post-process function path A uses ("default" -> top-level array, "cohere" -> results).
    post_process: Literal["default", "cohere"] = "default"
    # > 1 adds `oversample` (size x factor before the search) and `truncate_hits` (back to size after).
    sample_factor: float = 1.0
    # True: a reranker failure returns the first-stage order, with nothing in the response marking it.
    ignore_failure: bool = False
    # Path B reads one document field; unset uses the last of `fields` (the body text, by convention).
    scores_field: str | None = None
    # Path B: where in the search request the query text is (MLInferenceSearchResponseProcessor reads
    # `_request.` + this path from the request source; `ext.ml_inference` is accepted from 2.19).
    query_text_path: str = "ext.ml_inference.query_text"
    target_field: str = "rerank_score"
    # 3.8+ only; None keeps the processor's default field name `previous_score`.
    previous_score_field: str | None = None
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.fields or any(not f or "," in f for f in self.fields):
            raise ValueError(f"fields must be non-empty field names, got {self.fields!r}")
        parts = urlsplit(self.sidecar_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"sidecar URL must be http(s)://host[:port], got {self.sidecar_url!r}")
        for name in ("connection_timeout_s", "read_timeout_s", "max_connection"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1 (seconds for timeouts), got {value!r}")
        if self.max_retry_times < 0:
            raise ValueError("max_retry_times must be >= 0")
        if self.sample_factor < 1.0:
            raise ValueError(f"sample_factor must be >= 1.0, got {self.sample_factor}")
        if self.post_process not in ("default", "cohere"):
            raise ValueError("post_process must be 'default' or 'cohere'")
        if (
            self.previous_score_field
            and version_tuple(self.opensearch_version) < PREVIOUS_SCORE_FIELD_VERSION
        ):
            raise UnsupportedVersion(
                f"previous_score_field needs OpenSearch 3.8+, the cluster is {self.opensearch_version}"
            )

    @property
    def base_url(self) -> str:
        return self.sidecar_url.rstrip("/")

    @property
    def version(self) -> tuple[int, int, int]:
        return version_tuple(self.opensearch_version)

    @property
    def document_field(self) -> str:
        return self.scores_field or self.fields[-1]

    def with_version(self, version: str) -> PluginConfig:
        return replace(self, opensearch_version=version)


# ---- names ------------------------------------------------------------------------------------
def connector_name(cfg: PluginConfig, kind: Kind) -> str:
    return cfg.name if kind == "rerank" else f"{cfg.name}-scores"


def model_name(cfg: PluginConfig, kind: Kind) -> str:
    return connector_name(cfg, kind)


def model_group_name(cfg: PluginConfig) -> str:
    return cfg.name


def pipeline_name(cfg: PluginConfig, kind: Kind) -> str:
    return cfg.name if kind == "rerank" else f"{cfg.name}-by-field"


def default_pipeline_name(cfg: PluginConfig, kind: Kind) -> str:
    """The variant an index gets as `index.search.default_pipeline` (see default_pipeline_config)."""
    return pipeline_name(cfg, kind) + "-default"


def default_pipeline_config(cfg: PluginConfig) -> PluginConfig:
    """A default pipeline also runs for searches that are not reranking requests: counts, aggregations
    (size 0), pages past the last hit, searches without `ext`. On those the 2.19 processors throw (rerank:
    NullPointerException without ext.rerank, "No text documents were provided" on an empty page; ml_inference:
    missing input without ext.ml_inference; by_field: hits[0] of an empty page) and the whole search fails,
    _count included. With ignore_failure they pass through untouched; the price is that a sidecar outage
    then returns first-stage order on reranking searches too, with nothing marking it."""
    return replace(cfg, ignore_failure=True)


# ---- versions ---------------------------------------------------------------------------------
def version_tuple(version: str) -> tuple[int, int, int]:
    """'2.19.1' -> (2, 19, 1); tolerates suffixes such as '3.0.0-SNAPSHOT'."""
    nums = [int(m) for m in re.findall(r"\d+", version.split("-")[0])[:3]]
    if not nums:
        raise ValueError(f"not an OpenSearch version: {version!r}")
    nums += [0] * (3 - len(nums))
    return nums[0], nums[1], nums[2]


def check_version(version: str) -> None:
    if version_tuple(version) < MIN_VERSION:
        raise UnsupportedVersion(
            f"OpenSearch {version} is too old: the sidecar integration needs 2.19+ "
            "(ml_inference reads `ext.ml_inference` from 2.19; rerank.by_field exists from 2.18)"
        )


# ---- cluster settings -------------------------------------------------------------------------
_REGEX_SPECIALS = set(".^$*+?()[]{}|\\")


def endpoint_regex(sidecar_url: str) -> str:
    """The trusted-endpoint regex for exactly this sidecar origin (Java regex syntax)."""
    parts = urlsplit(sidecar_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    escaped = "".join("\\" + c if c in _REGEX_SPECIALS else c for c in origin)
    return f"^{escaped}/.*$"


def needs_private_ip(sidecar_url: str) -> bool:
    """True when the sidecar's host is loopback, private or link-local (ml-commons refuses those unless
    `plugins.ml_commons.connector.private_ip_enabled`). Names other than localhost are resolved by the
    cluster, not here: for a name that resolves privately, pass the setting explicitly."""
    host = urlsplit(sidecar_url).hostname or ""
    if host == "localhost" or "." not in host or host.endswith((".localhost", ".svc", ".local", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_private or ip.is_loopback or ip.is_link_local


TRUSTED_ENDPOINTS = "plugins.ml_commons.trusted_connector_endpoints_regex"
PRIVATE_IP = "plugins.ml_commons.connector.private_ip_enabled"


def cluster_settings(
    cfg: PluginConfig, existing_regexes: list[str] | tuple[str, ...] = (), private_ip: bool | None = None
) -> dict[str, Any]:
    """PUT /_cluster/settings. The regex list is replaced as a whole by OpenSearch, so the current
    entries are kept and ours appended (the installer reads them first)."""
    ours = endpoint_regex(cfg.sidecar_url)
    regexes = list(existing_regexes)
    if ours not in regexes:
        regexes.append(ours)
    persistent: dict[str, Any] = {TRUSTED_ENDPOINTS: regexes}
    if private_ip is None:
        private_ip = needs_private_ip(cfg.sidecar_url)
    if private_ip:
        persistent[PRIVATE_IP] = True
    return {"persistent": persistent}


# ---- connector, model group, model ------------------------------------------------------------
def connector_body(cfg: PluginConfig, kind: Kind) -> dict[str, Any]:
    # The sidecar stops work (and answers) a little before the connector would give up reading.
    budget_ms = max(100, cfg.read_timeout_s * 1000 - 250)
    action: dict[str, Any] = {
        "action_type": "predict",
        "method": "POST",
        "headers": {"content-type": "application/json", mlcommons.TIMEOUT_HEADER: str(budget_ms)},
    }
    if kind == "rerank":
        if cfg.post_process == "default":
            pre, post, path = (
                mlcommons.DEFAULT_PRE_PROCESS,
                mlcommons.DEFAULT_POST_PROCESS,
                mlcommons.PATH_LIST,
            )
        else:
            pre, post, path = (
                mlcommons.COHERE_PRE_PROCESS,
                mlcommons.COHERE_POST_PROCESS,
                mlcommons.PATH_COHERE,
            )
        action.update(
            url=cfg.base_url + path,
            pre_process_function=pre,
            request_body=mlcommons.RERANK_REQUEST_BODY,
            post_process_function=post,
        )
        what = "rerank processor (ml_opensearch)"
    else:
        action.update(url=cfg.base_url + mlcommons.PATH_SCORES, request_body=mlcommons.SCORES_REQUEST_BODY)
        what = "ml_inference + rerank.by_field (scores in input order)"
    return {
        "name": connector_name(cfg, kind),
        "description": f"Rerank sidecar at {cfg.base_url} for the {what}; {MANAGED_BY}",
        "version": "1",
        "protocol": "http",
        "parameters": {},
        "client_config": {
            "max_connection": cfg.max_connection,
            "connection_timeout": cfg.connection_timeout_s,
            "read_timeout": cfg.read_timeout_s,
            "max_retry_times": cfg.max_retry_times,
        },
        "actions": [action],
        # ml-commons refuses a connector without a non-empty credential map (MLCreateConnectorInput, 2.19 and
        # 3.x); the sidecar takes none, so this placeholder is never sent. Connector reads strip it.
        "credential": {CREDENTIAL_KEY: "unused"},
    }


def model_group_body(cfg: PluginConfig) -> dict[str, Any]:
    return {"name": model_group_name(cfg), "description": f"Rerank sidecar models; {MANAGED_BY}"}


def model_body(
    cfg: PluginConfig, kind: Kind, connector_id: str = CONNECTOR_ID, model_group_id: str = MODEL_GROUP_ID
) -> dict[str, Any]:
    return {
        "name": model_name(cfg, kind),
        "function_name": "remote",
        "model_group_id": model_group_id,
        "description": f"Rerank sidecar ({kind}); {MANAGED_BY}",
        "connector_id": connector_id,
    }


# ---- pipelines --------------------------------------------------------------------------------
def pipeline_body(cfg: PluginConfig, kind: Kind, model_id: str = MODEL_ID) -> dict[str, Any]:
    request_processors: list[dict[str, Any]] = []
    response_processors: list[dict[str, Any]] = []
    if cfg.sample_factor > 1.0:
        request_processors.append(
            {"oversample": {"sample_factor": cfg.sample_factor, "tag": "rerank-window"}}
        )
    if kind == "rerank":
        response_processors.append(
            {
                "rerank": {
                    "ml_opensearch": {"model_id": model_id},
                    "context": {"document_fields": list(cfg.fields)},
                    "tag": "sidecar-rerank",
                    "ignore_failure": cfg.ignore_failure,
                }
            }
        )
    else:
        response_processors.append(
            {
                "ml_inference": {
                    "model_id": model_id,
                    "function_name": "remote",
                    "input_map": [
                        {"documents": cfg.document_field, "query": "_request." + cfg.query_text_path}
                    ],
                    "output_map": [{cfg.target_field: "scores"}],
                    # Many-to-one: one model call for all hits; the answer's list is split per hit.
                    "one_to_one": False,
                    # A hit without the field would shift every later score onto the wrong hit.
                    "ignore_missing": False,
                    # A stale stored field with the same name must never win over the fresh score.
                    "override": True,
                    "tag": "sidecar-scores",
                    "ignore_failure": cfg.ignore_failure,
                }
            }
        )
        by_field: dict[str, Any] = {
            "target_field": cfg.target_field,
            "remove_target_field": True,
            "keep_previous_score": True,
        }
        if cfg.previous_score_field:
            by_field["previous_score_field"] = cfg.previous_score_field
        response_processors.append(
            {
                "rerank": {
                    "by_field": by_field,
                    "tag": "sidecar-by-field",
                    "ignore_failure": cfg.ignore_failure,
                }
            }
        )
    if cfg.sample_factor > 1.0:
        response_processors.append({"truncate_hits": {"tag": "rerank-window"}})
    body: dict[str, Any] = {"description": f"Rerank with the sidecar ({kind}); {MANAGED_BY}"}
    if request_processors:
        body["request_processors"] = request_processors
    body["response_processors"] = response_processors
    return body


# ---- smoke tests and example searches ---------------------------------------------------------
SMOKE_QUERY = "what does a reranker do"
SMOKE_DOCS = ["Bananas are rich in potassium.", "A reranker reorders search results by relevance to a query."]


def smoke_request(kind: Kind, model_id: str = MODEL_ID) -> tuple[str, str, dict[str, Any]]:
    """(method, path, body) that exercises the deployed model end to end through its connector."""
    if kind == "rerank":
        # Not /_predict/text_similarity/: on 2.19 that REST path is refused when
        # plugins.ml_commons.local_model.enabled is false (usual where only remote models run). The
        # parameters the rerank pre-process would produce go through the same connector and post-process.
        return (
            "POST",
            f"/_plugins/_ml/models/{model_id}/_predict",
            {"parameters": {"query": SMOKE_QUERY, "documents": list(SMOKE_DOCS), "top_n": len(SMOKE_DOCS)}},
        )
    return (
        "POST",
        f"/_plugins/_ml/models/{model_id}/_predict",
        {"parameters": {"query": SMOKE_QUERY, "documents": list(SMOKE_DOCS)}},
    )


def search_body(cfg: PluginConfig, kind: Kind, query_text: str, size: int = 10) -> dict[str, Any]:
    """A BM25 search whose hits the pipeline reranks; the query text travels in `ext`."""
    query: dict[str, Any] = (
        {"match": {cfg.fields[0]: query_text}}
        if len(cfg.fields) == 1
        else {"multi_match": {"query": query_text, "fields": list(cfg.fields)}}
    )
    body: dict[str, Any] = {"size": size, "query": query}
    if kind == "rerank":
        body["ext"] = {"rerank": {"query_context": {"query_text": query_text}}}
    else:
        head, _, leaf = cfg.query_text_path.rpartition(".")
        if head != "ext.ml_inference":
            raise ValueError(
                f"search_body only writes ext.ml_inference.*; query_text_path is {cfg.query_text_path!r}"
            )
        body["ext"] = {"ml_inference": {leaf: query_text}}
    return body


# ---- everything, in order ---------------------------------------------------------------------
@dataclass(frozen=True)
class RenderedRequest:
    filename: str
    method: str
    path: str
    body: dict[str, Any]
    note: str = ""


def render_all(
    cfg: PluginConfig, kinds: tuple[Kind, ...] = KINDS, index: str = "docs"
) -> list[RenderedRequest]:
    """Every request the installer makes, with placeholder ids, in the order it makes them."""
    check_version(cfg.opensearch_version)
    out = [
        RenderedRequest(
            "01-cluster-settings.json",
            "PUT",
            "/_cluster/settings",
            cluster_settings(cfg),
            "keep any regexes already in the list: the list is replaced as a whole",
        ),
        RenderedRequest(
            "02-model-group.json", "POST", "/_plugins/_ml/model_groups/_register", model_group_body(cfg)
        ),
    ]
    step = 3
    for kind in kinds:
        tag = "rerank" if kind == "rerank" else "by-field"
        m_method, m_path, m_body = smoke_request(kind)
        out += [
            RenderedRequest(
                f"{step:02d}-{tag}-connector.json",
                "POST",
                "/_plugins/_ml/connectors/_create",
                connector_body(cfg, kind),
            ),
            RenderedRequest(
                f"{step + 1:02d}-{tag}-model.json",
                "POST",
                "/_plugins/_ml/models/_register?deploy=true",
                model_body(cfg, kind),
            ),
            RenderedRequest(f"{step + 2:02d}-{tag}-smoke-test.json", m_method, m_path, m_body),
            RenderedRequest(
                f"{step + 3:02d}-{tag}-pipeline.json",
                "PUT",
                f"/_search/pipeline/{pipeline_name(cfg, kind)}",
                pipeline_body(cfg, kind),
            ),
            RenderedRequest(
                f"{step + 4:02d}-{tag}-search.json",
                "POST",
                f"/{index}/_search?search_pipeline={pipeline_name(cfg, kind)}",
                search_body(cfg, kind, "what does a reranker do", size=10),
            ),
        ]
        step += 5
    return out
