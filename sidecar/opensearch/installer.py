"""Install and uninstall the sidecar integration on an OpenSearch cluster, idempotently.

install: cluster settings (trusted endpoint, private IP) -> model group -> per path: connector (created, or
updated in place when it differs) -> remote model (registered once, deployed) -> smoke test through
ml-commons -> search pipeline -> optionally the index's default pipeline. Every resource is found by
name first, so a second run updates and never duplicates. uninstall removes the same names.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sidecar.opensearch import templates as T

if TYPE_CHECKING:
    from opensearchpy import OpenSearch

ML = "/_plugins/_ml"
REQUIRED_PLUGINS = {"opensearch-ml": "ml-commons", "opensearch-neural-search": "neural-search"}
DEPLOYED_STATES = {"DEPLOYED", "PARTIALLY_DEPLOYED"}
FAILED_STATES = {"DEPLOY_FAILED"}


class InstallError(RuntimeError):
    """A failure the user can act on; the message says what to do."""


@dataclass
class Step:
    what: str  # "connector", "model", "pipeline", ...
    name: str
    action: str  # created, updated, unchanged, deleted, absent, deployed, set, reset, ok
    id: str = ""

    def __str__(self) -> str:
        ident = f" ({self.id})" if self.id and self.id != self.name else ""
        return f"{self.what:<16} {self.name}{ident}: {self.action}"


@dataclass
class Report:
    version: str = ""
    steps: list[Step] = field(default_factory=list)
    model_ids: dict[str, str] = field(default_factory=dict)
    pipelines: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, step: Step) -> Step:
        self.steps.append(step)
        return step


def _error_text(exc: Exception) -> str:
    info = getattr(exc, "info", None)
    if isinstance(info, dict):
        err = info.get("error", info)
        if isinstance(err, dict):
            return str(err.get("reason") or err.get("root_cause") or err)
        return str(err)
    return str(getattr(exc, "error", "") or exc)


def _status(exc: Exception) -> int | None:
    code = getattr(exc, "status_code", None)
    return code if isinstance(code, int) else None


def _hint(message: str, cfg: T.PluginConfig) -> str:
    low = message.lower()
    host = cfg.base_url
    if ("trusted" in low and "regex" in low) or "not matching the trusted" in low:
        return (
            f"the cluster refuses the endpoint: add {T.endpoint_regex(cfg.sidecar_url)!r} to "
            f"{T.TRUSTED_ENDPOINTS} (install does this unless --skip-settings)"
        )
    if "private ip" in low or "private_ip" in low:
        return f"the sidecar address is private: set {T.PRIVATE_IP}=true (install --private-ip)"
    if (
        "connection refused" in low
        or "connect timed out" in low
        or "unable to execute http request" in low
        or "unknownhost" in low
        or "connectexception" in low
    ):
        return (
            f"OpenSearch cannot reach the sidecar at {host}: the URL is resolved on the OpenSearch nodes "
            "(127.0.0.1 is the node itself), so run the sidecar beside every node or give a reachable URL"
        )
    if "read timed out" in low or "timeout" in low:
        return (
            f"the sidecar did not answer within read_timeout={cfg.read_timeout_s}s: raise --read-timeout or "
            "check the sidecar's /metrics for queue time"
        )
    return ""


class Installer:
    def __init__(
        self,
        client: OpenSearch,
        cfg: T.PluginConfig,
        log: Callable[[str], None] = print,
        deploy_timeout_s: float = 120.0,
        poll_s: float = 0.5,
    ) -> None:
        self.client = client
        self.cfg = cfg
        self.log = log
        self.deploy_timeout_s = deploy_timeout_s
        self.poll_s = poll_s
        # Set by apply_settings when a changed setting only reaches models through a redeploy.
        self.redeploy = False

    # ---- transport ------------------------------------------------------------------------------
    def _req(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        return self.client.transport.perform_request(method, path, params=params, body=body)

    def _try(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        missing_ok: bool = False,
        doing: str = "",
    ) -> Any:
        from opensearchpy.exceptions import ConnectionError as OSConnectionError
        from opensearchpy.exceptions import TransportError

        try:
            return self._req(method, path, body, params)
        except OSConnectionError:
            raise  # the CLI turns it into one line (connection.cluster_error_line)
        except TransportError as exc:
            status = _status(exc)
            if missing_ok and status == 404:
                return None
            text = _error_text(exc)
            if status in (401, 403):
                raise InstallError(
                    f"{doing or path}: OpenSearch said {status} ({text}); give credentials with "
                    "ml_full_access and cluster settings rights "
                    "(--username/--password or OPENSEARCH_USERNAME/_PASSWORD)"
                ) from exc
            if status == 400 and "no handler found" in text:
                raise InstallError(
                    f"{doing or path}: the cluster has no handler for {method} {path}; it lacks the "
                    "ml-commons or neural-search plugin (OpenSearch 2.19+ / 3.x with both is required)"
                ) from exc
            hint = _hint(text, self.cfg)
            raise InstallError(
                f"{doing or path} failed ({status}): {text}" + (f"\n  hint: {hint}" if hint else "")
            ) from exc

    # ---- preflight ------------------------------------------------------------------------------
    def preflight(self) -> str:
        """Cluster version and plugins; raises InstallError when the cluster cannot host the integration."""
        info = self._try("GET", "/", doing="reading the cluster version")
        version = str(info.get("version", {}).get("number", ""))
        distribution = info.get("version", {}).get("distribution", "opensearch")
        if distribution != "opensearch":
            raise InstallError(f"the cluster is {distribution} {version}, not OpenSearch")
        try:
            T.check_version(version)
        except T.UnsupportedVersion as exc:
            raise InstallError(str(exc)) from exc
        from opensearchpy.exceptions import AuthorizationException

        try:
            plugins = self._req("GET", "/_cat/plugins", params={"format": "json"})
        except AuthorizationException:
            self.log(
                "warning: not allowed to list plugins; assuming ml-commons and neural-search are installed"
            )
            return version
        components = {p.get("component") for p in plugins or []}
        missing = [label for comp, label in REQUIRED_PLUGINS.items() if comp not in components]
        if missing:
            raise InstallError(
                f"the cluster at OpenSearch {version} lacks the {' and '.join(missing)} plugin(s): the "
                "integration needs ml-commons (remote models, ml_inference) and neural-search (rerank). "
                "Use a distribution that bundles them (the official opensearchproject/opensearch image does)"
            )
        return version

    # ---- settings -------------------------------------------------------------------------------
    def _current_setting(self, key: str) -> tuple[str, Any]:
        """(scope, value) of a cluster setting: transient beats persistent beats defaults."""
        got = (
            self._try(
                "GET",
                "/_cluster/settings",
                params={"include_defaults": "true", "flat_settings": "true"},
                doing="reading cluster settings",
            )
            or {}
        )
        for scope in ("transient", "persistent", "defaults"):
            values = got.get(scope) or {}
            if key in values:
                return scope, values[key]
            indexed = sorted(
                (k for k in values if k.startswith(key + ".")),
                key=lambda k: int(k.rsplit(".", 1)[1]) if k.rsplit(".", 1)[1].isdigit() else 0,
            )
            if indexed:
                return scope, [values[k] for k in indexed]
        return "", None

    def apply_settings(self, report: Report, private_ip: bool | None) -> None:
        scope, current = self._current_setting(T.TRUSTED_ENDPOINTS)
        regexes = list(current) if isinstance(current, list) else ([current] if current else [])
        body = T.cluster_settings(self.cfg, regexes, private_ip)
        ours = T.endpoint_regex(self.cfg.sidecar_url)
        changed = ours not in regexes
        if T.PRIVATE_IP in body["persistent"]:
            _, ip_now = self._current_setting(T.PRIVATE_IP)
            if str(ip_now).lower() == "true":
                del body["persistent"][T.PRIVATE_IP]
            else:
                changed = True
        if scope == "transient":  # a transient value shadows ours: write where it lives
            body["transient"] = {T.TRUSTED_ENDPOINTS: body["persistent"][T.TRUSTED_ENDPOINTS]}
        if changed:
            self._try("PUT", "/_cluster/settings", body, doing="updating cluster settings")
            # From 3.4 ml-commons copies private_ip_enabled (and from 3.8 the trusted-endpoint regex) into a
            # remote model when it deploys: a model deployed before the change keeps refusing the sidecar.
            ip_changed = T.PRIVATE_IP in body["persistent"]
            self.redeploy = (ip_changed and self.cfg.version >= T.PRIVATE_IP_COPIED_VERSION) or (
                ours not in regexes and self.cfg.version >= T.REGEX_COPIED_VERSION
            )
        report.add(Step("cluster settings", ours, "updated" if changed else "unchanged"))

    def remove_settings(self, report: Report) -> None:
        scope, current = self._current_setting(T.TRUSTED_ENDPOINTS)
        ours = T.endpoint_regex(self.cfg.sidecar_url)
        regexes = list(current) if isinstance(current, list) else ([current] if current else [])
        if ours not in regexes or scope == "defaults":
            report.add(Step("cluster settings", ours, "absent"))
            return
        rest = [r for r in regexes if r != ours]
        self._try(
            "PUT",
            "/_cluster/settings",
            {scope: {T.TRUSTED_ENDPOINTS: rest}},
            doing="updating cluster settings",
        )
        report.add(Step("cluster settings", ours, "deleted"))
        report.notes.append(f"{T.PRIVATE_IP} was left as it is: other connectors may rely on it")

    # ---- ml-commons lookups ---------------------------------------------------------------------
    def _find(self, what: str, name: str) -> list[dict[str, Any]]:
        """Hits of /_plugins/_ml/<what>/_search with exactly this name (an absent system index is none)."""
        body = {"query": {"term": {"name.keyword": name}}, "size": 100}
        got = self._try("POST", f"{ML}/{what}/_search", body, missing_ok=True, doing=f"searching {what}")
        hits = (got or {}).get("hits", {}).get("hits", [])
        return [
            h for h in hits if h.get("_source", {}).get("name") == name and "chunk_number" not in h["_source"]
        ]

    def _models_using(self, connector_id: str) -> list[dict[str, Any]]:
        body = {"query": {"match": {"connector_id": connector_id}}, "size": 100}
        got = self._try("POST", f"{ML}/models/_search", body, missing_ok=True, doing="searching models")
        hits = (got or {}).get("hits", {}).get("hits", [])
        return [h for h in hits if h.get("_source", {}).get("connector_id") == connector_id]

    def _model_state(self, model_id: str) -> str:
        got = self._try("GET", f"{ML}/models/{model_id}", doing=f"reading model {model_id}")
        return str(got.get("model_state", ""))

    def _wait_task(self, task_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.deploy_timeout_s
        while True:
            task = self._try("GET", f"{ML}/tasks/{task_id}", doing=f"reading task {task_id}")
            state = task.get("state", "")
            if state == "COMPLETED":
                return task
            if state in ("FAILED", "CANCELLED", "COMPLETED_WITH_ERROR"):
                raise InstallError(f"ml-commons task {task_id} {state}: {task.get('error', '')}")
            if time.monotonic() > deadline:
                raise InstallError(
                    f"ml-commons task {task_id} still {state} after {self.deploy_timeout_s:.0f}s"
                )
            time.sleep(self.poll_s)

    def _deploy(self, model_id: str, requested: bool = False) -> bool:
        """Deploy unless deployed, and wait; True when it had to. `requested`: a deploy is already under
        way (register?deploy=true), so only poll, and ask again once only if it never starts."""
        state = self._model_state(model_id)
        if state in DEPLOYED_STATES:
            return False
        deadline = time.monotonic() + self.deploy_timeout_s
        nudge_at = time.monotonic() + (10.0 if requested else 0.0)
        while True:
            if state in DEPLOYED_STATES:
                return True
            if state in FAILED_STATES or time.monotonic() > deadline:
                raise InstallError(
                    f"model {model_id} did not deploy (state {state or 'unknown'}); see "
                    f"GET {ML}/profile/models/{model_id} and the OpenSearch log"
                )
            if state != "DEPLOYING" and time.monotonic() >= nudge_at:
                self._try("POST", f"{ML}/models/{model_id}/_deploy", doing=f"deploying model {model_id}")
                nudge_at = float("inf")
            time.sleep(self.poll_s)
            state = self._model_state(model_id)

    def _undeploy(self, model_id: str) -> None:
        self._try(
            "POST", f"{ML}/models/{model_id}/_undeploy", missing_ok=True, doing=f"undeploying {model_id}"
        )
        deadline = time.monotonic() + self.deploy_timeout_s
        while self._model_state(model_id) in DEPLOYED_STATES | {"DEPLOYING"}:
            if time.monotonic() > deadline:
                raise InstallError(f"model {model_id} is still deployed after {self.deploy_timeout_s:.0f}s")
            time.sleep(self.poll_s)

    def _delete_connector(self, cid: str, name: str, report: Report) -> None:
        """DELETE a connector. ml-commons 2.19 looks for "models still using this connector" with a match
        query on the analysed connector_id: a just-deleted model (until the model index refreshes) and any
        model of another connector whose id shares a token both block it. The first passes in a moment;
        the second is left in place with a note, since those models are not ours to delete."""
        deadline = time.monotonic() + 5.0
        while True:
            try:
                self._try(
                    "DELETE", f"{ML}/connectors/{cid}", missing_ok=True, doing=f"deleting connector {name}"
                )
                report.add(Step("connector", name, "deleted", cid))
                return
            except InstallError as exc:
                blocking = _blocking_models(str(exc))
                if not blocking:
                    raise
                if time.monotonic() > deadline:
                    report.add(Step("connector", name, "left in place", cid))
                    report.notes.append(
                        f"ml-commons refused to delete connector {name} ({cid}) because models "
                        f"{', '.join(blocking)} match its id as text although they use other connectors; "
                        f"delete it once they are gone: DELETE {ML}/connectors/{cid}"
                    )
                    return
                time.sleep(self.poll_s)

    # ---- install steps --------------------------------------------------------------------------
    def ensure_model_group(self, report: Report) -> str:
        name = T.model_group_name(self.cfg)
        found = self._find("model_groups", name)
        if found:
            report.add(Step("model group", name, "unchanged", found[0]["_id"]))
            return str(found[0]["_id"])
        got = self._try(
            "POST",
            f"{ML}/model_groups/_register",
            T.model_group_body(self.cfg),
            doing="creating the model group",
        )
        report.add(Step("model group", name, "created", got["model_group_id"]))
        return str(got["model_group_id"])

    def ensure_connector(self, kind: T.Kind, report: Report) -> str:
        want = T.connector_body(self.cfg, kind)
        name = want["name"]
        found = self._find("connectors", name)
        if not found:
            got = self._try("POST", f"{ML}/connectors/_create", want, doing=f"creating connector {name}")
            report.add(Step("connector", name, "created", got["connector_id"]))
            return str(got["connector_id"])
        cid = str(found[0]["_id"])
        if _contains(found[0]["_source"], _as_stored(want)):
            report.add(Step("connector", name, "unchanged", cid))
            return cid
        # ml-commons refuses to update a connector a deployed model uses (UpdateConnectorTransportAction).
        users = [
            h["_id"]
            for h in self._models_using(cid)
            if h["_source"].get("model_state") in DEPLOYED_STATES | {"DEPLOYING"}
        ]
        for mid in users:
            self._undeploy(mid)
        update = {k: v for k, v in want.items() if k != "name"}
        try:
            self._try("PUT", f"{ML}/connectors/{cid}", update, doing=f"updating connector {name}")
        except InstallError as exc:
            # ml-commons 2.19 finds "models using this connector" with a match query on the analysed
            # connector_id, so a model of another connector whose id shares a token blocks the update.
            others = _blocking_models(str(exc))
            if not others:
                raise
            for mid in others:
                self._undeploy(mid)
            users += [m for m in others if m not in users]
            self._try("PUT", f"{ML}/connectors/{cid}", update, doing=f"updating connector {name}")
        for mid in users:
            self._deploy(mid)
        report.add(Step("connector", name, "updated", cid))
        return cid

    def ensure_model(self, kind: T.Kind, connector_id: str, group_id: str, report: Report) -> str:
        name = T.model_name(self.cfg, kind)
        for hit in self._find("models", name):
            old = str(hit["_id"])
            if hit["_source"].get("connector_id") == connector_id:
                if self.redeploy and self._model_state(old) in DEPLOYED_STATES:
                    self._undeploy(old)
                    self._deploy(old)
                    report.add(Step("model", name, "redeployed", old))
                    return old
                action = "deployed" if self._deploy(old) else "unchanged"
                report.add(Step("model", name, action, old))
                return old
            # Registered against another connector (e.g. one deleted by hand): replace it.
            self._undeploy(old)
            self._try("DELETE", f"{ML}/models/{old}", missing_ok=True, doing=f"deleting stale model {old}")
        got = self._try(
            "POST",
            f"{ML}/models/_register",
            T.model_body(self.cfg, kind, connector_id, group_id),
            params={"deploy": "true"},
            doing=f"registering model {name}",
        )
        mid = str(got.get("model_id") or self._wait_task(str(got["task_id"])).get("model_id") or "")
        if not mid:
            raise InstallError(f"registering {name} returned no model id: {got}")
        self._deploy(mid, requested=True)
        report.add(Step("model", name, "created", mid))
        return mid

    def smoke_test(self, kind: T.Kind, model_id: str, report: Report) -> list[float]:
        method, path, body = T.smoke_request(kind, model_id)
        got = self._try(method, path, body, doing=f"smoke-testing the {kind} model through ml-commons")
        try:
            outputs = got["inference_results"][0]["output"]
            if kind == "rerank":
                scores = [float(o["data"][0]) for o in outputs]
            else:
                scores = [float(s) for s in outputs[0]["dataAsMap"]["scores"]]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise InstallError(f"the {kind} smoke test returned an unexpected shape: {got}") from exc
        if len(scores) != len(T.SMOKE_DOCS):
            raise InstallError(
                f"the {kind} smoke test returned {len(scores)} scores for {len(T.SMOKE_DOCS)} documents"
            )
        if not scores[1] > scores[0]:
            report.notes.append(
                f"{kind} smoke test: the relevant document did not score higher ({scores}); "
                "is the sidecar serving a reranking model?"
            )
        report.add(Step("smoke test", kind, "ok", " ".join(f"{s:.4f}" for s in scores)))
        return scores

    def put_pipeline(self, kind: T.Kind, model_id: str, report: Report, default: bool = False) -> str:
        """The search pipeline of `kind`; `default`: the variant for index.search.default_pipeline."""
        cfg = T.default_pipeline_config(self.cfg) if default else self.cfg
        name = T.default_pipeline_name(self.cfg, kind) if default else T.pipeline_name(self.cfg, kind)
        body = T.pipeline_body(cfg, kind, model_id)
        existing = self._try(
            "GET", f"/_search/pipeline/{name}", missing_ok=True, doing=f"reading pipeline {name}"
        )
        current = (existing or {}).get(name)
        if current is not None and _contains(current, body):
            report.add(Step("search pipeline", name, "unchanged"))
        else:
            self._try("PUT", f"/_search/pipeline/{name}", body, doing=f"creating search pipeline {name}")
            report.add(Step("search pipeline", name, "updated" if current is not None else "created"))
        return name

    def check_index(self, index: str, report: Report) -> None:
        mapping = self._try(
            "GET", f"/{index}/_mapping", missing_ok=True, doing=f"reading the mapping of {index}"
        )
        if mapping is None:
            report.notes.append(
                f"index {index} does not exist yet; the pipelines work on any index with "
                f"the fields {', '.join(self.cfg.fields)}"
            )
            return
        for idx, m in mapping.items():
            props = m.get("mappings", {}).get("properties", {})
            for f in self.cfg.fields:
                if not _has_field(props, f):
                    report.notes.append(
                        f"index {idx} has no field {f!r} in its mapping: the reranker would see "
                        "an empty string for it (rerank) or fail the search (by_field)"
                    )

    def set_default_pipeline(self, index: str, pipeline: str, report: Report) -> None:
        self._try(
            "PUT",
            f"/{index}/_settings",
            {"index.search.default_pipeline": pipeline},
            doing=f"setting the default search pipeline of {index}",
        )
        report.add(Step("default pipeline", index, f"set to {pipeline}"))

    def install(
        self,
        kinds: Iterable[T.Kind] = T.KINDS,
        index: str | None = None,
        default_pipeline: T.Kind | None = None,
        smoke: bool = True,
        settings: bool = True,
        private_ip: bool | None = None,
    ) -> Report:
        kinds = tuple(kinds)
        if default_pipeline and default_pipeline not in kinds:
            raise InstallError(
                f"--default-pipeline {default_pipeline} is not among the installed paths {kinds}"
            )
        if default_pipeline and not index:
            raise InstallError("--default-pipeline needs --index")
        report = Report(version=self.preflight())
        self.cfg = self.cfg.with_version(report.version)
        dotted = [f for f in self.cfg.fields if "." in f]
        if "rerank" in kinds and dotted and self.cfg.version < T.DOTTED_FIELDS_VERSION:
            raise InstallError(
                f"neural-search {report.version} gives the rerank processor only top-level fields: "
                f"{', '.join(dotted)} would reach the sidecar as empty text; index a top-level copy of it "
                "or use the by_field path (--paths by_field --scores-field FIELD), which reads dotted paths"
            )
        if settings:
            self.apply_settings(report, private_ip)
        group = self.ensure_model_group(report)
        for kind in kinds:
            cid = self.ensure_connector(kind, report)
            mid = self.ensure_model(kind, cid, group, report)
            report.model_ids[kind] = mid
            if smoke:
                self.smoke_test(kind, mid, report)
            report.pipelines[kind] = self.put_pipeline(kind, mid, report)
        if "rerank" in kinds and len(self.cfg.fields) > 1:
            report.notes.append(
                f"the rerank processor concatenates {', '.join(self.cfg.fields)} with no separator "
                "(DocumentContextSourceFetcher), gluing the last word of one to the first of the next; "
                "a single field holding them joined by a space (the indexer's `passage`) reads better"
            )
        if index:
            self.check_index(index, report)
        if index and default_pipeline:
            name = self.put_pipeline(
                default_pipeline, report.model_ids[default_pipeline], report, default=True
            )
            self.set_default_pipeline(index, name, report)
            report.notes.append(
                f"the default pipeline {name} ignores reranker failures so counts, aggregations and searches "
                "without ext pass through; a sidecar outage then gives first-stage order unmarked"
            )
        return report

    # ---- uninstall ------------------------------------------------------------------------------
    def uninstall(self, kinds: Iterable[T.Kind] = T.KINDS, settings: bool = True) -> Report:
        kinds = tuple(kinds)
        info = self._try("GET", "/", doing="reading the cluster version")
        report = Report(version=str(info.get("version", {}).get("number", "")))
        names = {T.pipeline_name(self.cfg, k) for k in kinds} | {
            T.default_pipeline_name(self.cfg, k) for k in kinds
        }
        defaults = (
            self._try(
                "GET",
                "/_all/_settings/index.search.default_pipeline",
                params={"flat_settings": "true"},
                missing_ok=True,
                doing="reading index settings",
            )
            or {}
        )
        for idx, s in defaults.items():
            if s.get("settings", {}).get("index.search.default_pipeline") in names:
                self._try(
                    "PUT",
                    f"/{idx}/_settings",
                    {"index.search.default_pipeline": None},
                    doing=f"resetting the default pipeline of {idx}",
                )
                report.add(Step("default pipeline", idx, "reset"))
        for name in sorted(names):
            gone = self._try(
                "DELETE", f"/_search/pipeline/{name}", missing_ok=True, doing=f"deleting pipeline {name}"
            )
            report.add(Step("search pipeline", name, "deleted" if gone is not None else "absent"))
        # Every model before any connector: ml-commons' "models still using this connector" check matches
        # connector ids as analysed text, so another kind's model can block a connector's deletion.
        for kind in kinds:
            name = T.model_name(self.cfg, kind)
            models = self._find("models", name)
            for hit in models:
                self._undeploy(hit["_id"])
                self._try(
                    "DELETE", f"{ML}/models/{hit['_id']}", missing_ok=True, doing=f"deleting model {name}"
                )
                report.add(Step("model", name, "deleted", hit["_id"]))
            if not models:
                report.add(Step("model", name, "absent"))
        for kind in kinds:
            cname = T.connector_name(self.cfg, kind)
            connectors = self._find("connectors", cname)
            for hit in connectors:
                self._delete_connector(str(hit["_id"]), cname, report)
            if not connectors:
                report.add(Step("connector", cname, "absent"))
        group = T.model_group_name(self.cfg)
        for hit in self._find("model_groups", group):
            left = (
                self._try(
                    "POST",
                    f"{ML}/models/_search",
                    {"query": {"term": {"model_group_id": hit["_id"]}}, "size": 1},
                    missing_ok=True,
                    doing="searching models",
                )
                or {}
            )
            if left.get("hits", {}).get("hits"):
                report.notes.append(f"model group {group} still holds other models; left in place")
                continue
            self._try(
                "DELETE",
                f"{ML}/model_groups/{hit['_id']}",
                missing_ok=True,
                doing=f"deleting model group {group}",
            )
            report.add(Step("model group", group, "deleted", hit["_id"]))
        if settings:
            self.remove_settings(report)
        return report


def _blocking_models(message: str) -> list[str]:
    """Model ids from ml-commons' "N models are still using this connector ...: [id, id]"."""
    if "still using this connector" not in message:
        return []
    m = re.search(r"\[([^\]]*)\]", message)
    return [x.strip() for x in m.group(1).split(",") if x.strip()] if m else []


def _as_stored(connector: dict[str, Any]) -> dict[str, Any]:
    """A connector body as ml-commons returns it: reads strip `credential` and `action_type` is upper-case.
    Comparing anything else would make every re-run update the connector and redeploy its models."""
    out = {k: v for k, v in connector.items() if k != "credential"}
    out["actions"] = [{**a, "action_type": str(a["action_type"]).upper()} for a in connector["actions"]]
    return out


def _contains(have: Any, want: Any) -> bool:
    """True when every key/value of `want` is present and equal in `have` (extra keys in `have` are fine)."""
    if isinstance(want, dict):
        # An empty value may be stored as an absent key.
        return isinstance(have, dict) and all(
            _contains(have[k], v) if k in have else v in ({}, [], None) for k, v in want.items()
        )
    if isinstance(want, list):
        return isinstance(have, list) and len(have) == len(want) and all(map(_contains, have, want))
    if isinstance(want, float) and isinstance(have, int | float):
        return float(have) == want
    return bool(have == want)


def _has_field(props: dict[str, Any], dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    node = props.get(head)
    if node is None:
        return False
    if not rest:
        return True
    return _has_field(node.get("properties", {}), rest) or rest in node.get("fields", {})
