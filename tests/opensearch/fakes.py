"""The one fake of this test package: an in-memory stand-in for the OpenSearch REST surface the installer
uses (ml-commons connectors / model groups / models, search pipelines, cluster and index settings).

It is a fake of an EXTERNAL system, kept strict where ml-commons is strict (the refusals named below are
the real ones), and its `_predict` calls really reach the sidecar over HTTP through the connector, using
the byte-level restatement of ml-commons in mlcommons_java.py. Real-cluster tests cover the real thing.
"""

from __future__ import annotations

import http.client
import itertools
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.opensearch import mlcommons_java as J

TRUSTED = "plugins.ml_commons.trusted_connector_endpoints_regex"
PRIVATE_IP = "plugins.ml_commons.connector.private_ip_enabled"
DEFAULT_TRUSTED = ["^https://api\\.openai\\.com/.*$", "^https://api\\.cohere\\.ai/.*$"]


class ApiError(Exception):
    def __init__(self, status: int, reason: str, kind: str = "illegal_argument_exception") -> None:
        super().__init__(reason)
        self.status, self.reason, self.kind = status, reason, kind


class FakeCluster:
    def __init__(
        self, version: str = "3.1.0", plugins: tuple[str, ...] = ("opensearch-ml", "opensearch-neural-search")
    ):
        self.version = version
        self.plugins = plugins
        self.persistent: dict[str, Any] = {}
        self.transient: dict[str, Any] = {}
        self.connectors: dict[str, dict] = {}
        self.groups: dict[str, dict] = {}
        self.models: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.indices: dict[str, dict] = {}
        self.created_ml_index = False
        self.requests: list[tuple[str, str]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    # ---- routing ------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw.strip() else None
                params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                try:
                    with cluster._lock:
                        cluster.requests.append((self.command, parts.path))
                    status, out = cluster.route(self.command, parts.path, params, body)
                except ApiError as exc:
                    status = exc.status
                    out = {
                        "error": {"type": exc.kind, "reason": exc.reason, "root_cause": []},
                        "status": exc.status,
                    }
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

        return Handler

    def route(self, method: str, path: str, params: dict[str, str], body: Any) -> tuple[int, Any]:
        m = method
        if path == "/" and m == "GET":
            return 200, {"version": {"number": self.version, "distribution": "opensearch"}}
        if path == "/_cat/plugins":
            return 200, [{"name": "node-1", "component": c, "version": self.version} for c in self.plugins]
        if path == "/_cluster/settings":
            return self.cluster_settings(m, body)
        ml = re.fullmatch(r"/_plugins/_ml/(connectors|models|model_groups)/_search", path)
        if ml and m in ("GET", "POST"):
            return 200, self.search(ml.group(1), body or {})
        if "opensearch-ml" not in self.plugins and path.startswith("/_plugins/_ml"):
            raise ApiError(400, f"no handler found for uri [{path}] and method [{m}]")
        if path == "/_plugins/_ml/connectors/_create" and m == "POST":
            return 200, {"connector_id": self.create_connector(body)}
        if c := re.fullmatch(r"/_plugins/_ml/connectors/([^/]+)", path):
            return self.connector(m, c.group(1), body)
        if path == "/_plugins/_ml/model_groups/_register" and m == "POST":
            return 200, {"model_group_id": self.create_group(body), "status": "CREATED"}
        if g := re.fullmatch(r"/_plugins/_ml/model_groups/([^/]+)", path):
            return self.group(m, g.group(1))
        if path == "/_plugins/_ml/models/_register" and m == "POST":
            mid = self.register_model(body, params.get("deploy") == "true")
            return 200, {"task_id": self._id("task"), "status": "CREATED", "model_id": mid}
        if mm := re.fullmatch(r"/_plugins/_ml/models/([^/]+)(/_deploy|/_undeploy|/_predict)?", path):
            return self.model(m, mm.group(1), mm.group(2), body)
        if p := re.fullmatch(r"/_plugins/_ml/_predict/text_similarity/([^/]+)", path):
            return 200, self.predict(p.group(1), body, text_similarity=True)
        if sp := re.fullmatch(r"/_search/pipeline/([^/]+)", path):
            return self.pipeline(m, sp.group(1), body)
        if path == "/_all/_settings/index.search.default_pipeline":
            return 200, {
                name: {
                    "settings": {
                        "index.search.default_pipeline": idx["settings"]["index.search.default_pipeline"]
                    }
                }
                for name, idx in self.indices.items()
                if idx["settings"].get("index.search.default_pipeline")
            }
        if ix := re.fullmatch(r"/([^_/][^/]*)/(_mapping|_settings)", path):
            return self.index(m, ix.group(1), ix.group(2), body)
        raise ApiError(400, f"no handler found for uri [{path}] and method [{m}]")

    # ---- cluster settings ---------------------------------------------------------------------
    def cluster_settings(self, method: str, body: Any) -> tuple[int, Any]:
        if method == "GET":
            return 200, {
                "persistent": dict(self.persistent),
                "transient": dict(self.transient),
                "defaults": {TRUSTED: list(DEFAULT_TRUSTED), PRIVATE_IP: "false"},
            }
        for scope, store in (("persistent", self.persistent), ("transient", self.transient)):
            for k, v in (body.get(scope) or {}).items():
                if v is None:
                    store.pop(k, None)
                else:
                    store[k] = v
        return 200, {"acknowledged": True}

    def setting(self, key: str) -> Any:
        for store in (self.transient, self.persistent):
            if key in store:
                return store[key]
        return {TRUSTED: DEFAULT_TRUSTED, PRIVATE_IP: False}[key]

    # ---- ml-commons -------------------------------------------------------------------------------
    def search(self, what: str, body: dict) -> dict:
        store = {"connectors": self.connectors, "models": self.models, "model_groups": self.groups}[what]
        if not self.created_ml_index:
            raise ApiError(404, "no such index [.plugins-ml-config]", "index_not_found_exception")
        query = body.get("query", {})
        hits = []
        for doc_id, doc in store.items():
            if "term" in query:
                ((field, value),) = query["term"].items()
                if doc.get(field.removesuffix(".keyword")) != value:
                    continue
            if "match" in query:
                ((field, value),) = query["match"].items()
                if doc.get(field) != value:
                    continue
            hits.append({"_id": doc_id, "_source": dict(doc)})
        return {"hits": {"total": {"value": len(hits)}, "hits": hits[: body.get("size", 10)]}}

    def create_connector(self, body: dict) -> str:
        for required in ("name", "protocol", "actions"):
            if required not in body:
                raise ApiError(400, f"{required} is required")
        for key, value in body.get("client_config", {}).items():
            if key.endswith("timeout") and not isinstance(value, int):
                raise ApiError(400, f"{key} must be an integer number of seconds")
        self.created_ml_index = True
        cid = self._id("conn")
        self.connectors[cid] = dict(body)
        return cid

    def connector(self, method: str, cid: str, body: Any) -> tuple[int, Any]:
        if cid not in self.connectors:
            raise ApiError(
                404, f"Failed to find connector with the provided connector id: {cid}", "status_exception"
            )
        users = [mid for mid, m in self.models.items() if m["connector_id"] == cid]
        if method == "GET":
            return 200, self.connectors[cid]
        if method == "PUT":
            deployed = [mid for mid in users if self.models[mid]["model_state"] == "DEPLOYED"]
            if deployed:  # UpdateConnectorTransportAction
                raise ApiError(
                    400,
                    f"{len(deployed)} models are still using this connector, please undeploy the models "
                    f"first: {deployed}",
                )
            self.connectors[cid].update(body)
            return 200, {"result": "updated"}
        if method == "DELETE":
            if users:  # DeleteConnectorTransportAction
                raise ApiError(
                    409,
                    f"{len(users)} models are still using this connector, please delete or update the "
                    "models first",
                )
            del self.connectors[cid]
            return 200, {"result": "deleted"}
        raise ApiError(405, method)

    def create_group(self, body: dict) -> str:
        for gid, g in self.groups.items():
            if g["name"] == body["name"]:  # MLModelGroupManager
                raise ApiError(
                    400, f"The name you provided is already being used by a model group with ID: {gid}."
                )
        self.created_ml_index = True
        gid = self._id("group")
        self.groups[gid] = dict(body)
        return gid

    def group(self, method: str, gid: str) -> tuple[int, Any]:
        if gid not in self.groups:
            raise ApiError(404, "Failed to find model group")
        if method == "DELETE":
            if any(m["model_group_id"] == gid for m in self.models.values()):
                raise ApiError(409, "Cannot delete the model group when it has associated model versions")
            del self.groups[gid]
            return 200, {"result": "deleted"}
        return 200, self.groups[gid]

    def register_model(self, body: dict, deploy: bool) -> str:
        if body.get("connector_id") not in self.connectors:
            raise ApiError(400, "Failed to find connector")
        if body.get("model_group_id") not in self.groups:
            raise ApiError(400, "Failed to find model group")
        mid = self._id("model")
        self.models[mid] = {**body, "model_state": "DEPLOYING" if deploy else "REGISTERED", "polls": 0}
        return mid

    def model(self, method: str, mid: str, action: str | None, body: Any) -> tuple[int, Any]:
        if mid not in self.models:
            raise ApiError(404, "Failed to find model")
        model = self.models[mid]
        if action == "/_deploy":
            model["model_state"] = "DEPLOYING"
            return 200, {"task_id": self._id("task"), "status": "CREATED"}
        if action == "/_undeploy":
            model["model_state"] = "UNDEPLOYED"
            return 200, {}
        if action == "/_predict":
            return 200, self.predict(mid, body, text_similarity=False)
        if method == "DELETE":
            if model["model_state"] in ("DEPLOYED", "DEPLOYING"):
                raise ApiError(
                    400, "Model cannot be deleted in deploying or deployed state. Try undeploy model first"
                )
            del self.models[mid]
            return 200, {"result": "deleted"}
        if model["model_state"] == "DEPLOYING":  # deploys after one poll, so callers must poll
            model["polls"] += 1
            if model["polls"] > 1:
                model["model_state"] = "DEPLOYED"
        return 200, {k: v for k, v in model.items() if k != "polls"}

    def predict(self, mid: str, body: dict, text_similarity: bool) -> dict:
        model = self.models[mid]
        if model["model_state"] != "DEPLOYED":
            raise ApiError(400, f"Model not ready yet. Please deploy the model first. Model ID: {mid}")
        action = self.connectors[model["connector_id"]]["actions"][0]
        url = action["url"]
        if not any(re.match(r, url) for r in self.setting(TRUSTED)):
            raise ApiError(
                400, "Connector URL is not matching the trusted connector endpoint regex, URL is: " + url
            )
        host = urlsplit(url).hostname or ""
        if host in ("127.0.0.1", "localhost") and str(self.setting(PRIVATE_IP)).lower() != "true":
            raise ApiError(400, f"Remote inference host name has private ip address: {host}")
        if text_similarity:
            payload = J.rerank_request_body(action["request_body"], body["query_text"], body["text_docs"])
        else:
            params = body["parameters"]
            payload = J.ml_inference_request_body(
                action["request_body"], params["query"], params["documents"]
            )
        try:
            status, reply = _post(url, payload, action.get("headers", {}))
        except OSError as exc:
            raise ApiError(
                500, f"Remote inference failed: java.net.ConnectException: Connection refused ({exc})"
            ) from exc
        if not 200 <= status < 300:
            raise ApiError(status, f"Error from remote service: {reply.decode()}", "status_exception")
        if text_similarity:
            scores = J.parse_rerank_response(action["post_process_function"], reply, len(body["text_docs"]))
            output = [
                {"name": "similarity", "data_type": "FLOAT32", "shape": [1], "data": [s]} for s in scores
            ]
        else:
            output = [{"name": "response", "dataAsMap": json.loads(reply)}]
        return {"inference_results": [{"output": output, "status_code": 200}]}

    # ---- pipelines and indices ----------------------------------------------------------------
    def pipeline(self, method: str, name: str, body: Any) -> tuple[int, Any]:
        if method == "PUT":
            self.pipelines[name] = body
            return 200, {"acknowledged": True}
        if name not in self.pipelines:
            raise ApiError(404, f"Search pipeline [{name}] not found", "resource_not_found_exception")
        if method == "DELETE":
            del self.pipelines[name]
            return 200, {"acknowledged": True}
        return 200, {name: self.pipelines[name]}

    def add_index(self, name: str, properties: dict[str, Any]) -> None:
        self.indices[name] = {"mappings": {"properties": properties}, "settings": {}}

    def index(self, method: str, name: str, what: str, body: Any) -> tuple[int, Any]:
        if name not in self.indices:
            raise ApiError(404, f"no such index [{name}]", "index_not_found_exception")
        if what == "_mapping":
            return 200, {name: {"mappings": self.indices[name]["mappings"]}}
        if method == "PUT":
            for k, v in body.items():
                if v is None:
                    self.indices[name]["settings"].pop(k, None)
                else:
                    self.indices[name]["settings"][k] = v
            return 200, {"acknowledged": True}
        return 200, {name: {"settings": self.indices[name]["settings"]}}


def _post(url: str, payload: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        hdrs = dict(headers)
        if not any(k.lower() == "content-type" for k in hdrs):
            hdrs["Content-Type"] = "application/json"
        conn.request("POST", parts.path, body=payload, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
