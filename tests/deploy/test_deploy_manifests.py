"""The Kubernetes manifests: schema-valid offline for the stated version, and consistent with the ports,
health services, drain and metrics the sidecar really has."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    DEPLOY,
    DOCKERFILES,
    K8S_VERSION,
    containers,
    effective_instruction,
    env_values,
    find,
    is_gpu,
    parse_dockerfile,
    pod_labels,
    pod_spec,
    prestop_seconds,
    render_module,
    reranker,
    reranker_pods,
    resolve_port,
    selects,
    settings_from_env,
    shape,
    variants,
    workloads,
)

from sidecar.health import HEALTH_SERVICES
from sidecar.settings import SERVICE_NAME

VARIANTS = variants()
NEWEST = kubernetes_validate.utils.latest_version()
# Time left to OpenSearch itself before the reranker's drain in the sidecar shape: the kubelet stops
# the sidecar only after OpenSearch has exited, inside the same grace period.
OPENSEARCH_STOP_S = 60
MARGIN_S = 5
# Model loading + warm-up before the startup probe gives up.
MIN_STARTUP_S = {"cpu": 120, "gpu": 300}
IANA_SVC_NAME = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(?:-[a-z0-9]+)*$")
PSA_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def cases() -> list[Any]:
    return [pytest.param(name, docs, id=name) for name, docs in VARIANTS.items()]


def reranker_cases() -> list[Any]:
    return [
        pytest.param(name, doc, id=f"{name}-{doc['kind'].lower()}")
        for name, docs in VARIANTS.items()
        for doc in reranker_pods(docs)
    ]


def served(doc: dict[str, Any]):  # type: ignore[no-untyped-def]
    c = reranker(pod_spec(doc))
    assert c is not None
    return c, settings_from_env(env_values(c))


# ---- schema ------------------------------------------------------------------------------------
def test_committed_renders_are_current() -> None:
    assert render_module().stale() == [], "run `python deploy/render.py --write`"


def _manifest_files() -> list[Path]:
    return sorted((DEPLOY / "kubernetes").rglob("*.yaml"))


@pytest.mark.parametrize("version", [K8S_VERSION, NEWEST])
@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_validates_strictly(path: Path, version: str) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        # Raises on unknown kinds too (SchemaNotFoundError), so nothing passes unchecked.
        kubernetes_validate.validate(doc, version, strict=True)


def test_stated_version_is_bundled_and_supports_native_sidecars() -> None:
    assert K8S_VERSION in {v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()}
    assert tuple(int(x) for x in K8S_VERSION.split(".")) >= (1, 29)


def test_strict_validation_catches_mistakes() -> None:
    """Negative control: a misspelt field and a named gRPC probe port must both be refused."""
    sts = find(VARIANTS["sidecar"], "StatefulSet")
    broken = yaml.safe_load(yaml.safe_dump(sts))
    pod_spec(broken)["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(sts))
    pod_spec(broken)["initContainers"][0]["startupProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# ---- the sidecar's real ports, health services and shutdown -------------------------------------
@pytest.mark.parametrize(("variant", "docs"), cases())
def test_sidecar_shape_runs_the_reranker_as_a_native_sidecar(
    variant: str, docs: list[dict[str, Any]]
) -> None:
    sts = find(docs, "StatefulSet", "opensearch")
    spec = pod_spec(sts)
    inits = spec.get("initContainers", [])
    if shape(variant) == "sidecar":
        assert [c["name"] for c in inits][:1] == ["reranker"], "the reranker must start first"
        assert inits[0]["restartPolicy"] == "Always"
        assert [c["name"] for c in spec["containers"]] == ["opensearch"]
    else:
        assert reranker(spec) is None, "the shared shape calls a Service, not a sidecar"
        deployment = find(docs, "Deployment", "reranker")
        assert reranker(pod_spec(deployment)) in pod_spec(deployment)["containers"]


@pytest.mark.parametrize(("variant", "doc"), reranker_cases())
def test_named_ports_are_the_ports_the_sidecar_binds(variant: str, doc: dict[str, Any]) -> None:
    c, settings = served(doc)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": settings.grpc_port, "http": settings.http_port, "metrics": settings.metrics_port}
    assert all(ports.values()), "port 0 (pick a free one) cannot be probed or routed"
    # Kubelet probes and Services dial the pod IP: a loopback bind would fail every probe.
    assert settings.host == "0.0.0.0"


@pytest.mark.parametrize(("variant", "doc"), reranker_cases())
def test_probes_ask_grpc_health_on_the_grpc_port(variant: str, doc: dict[str, Any]) -> None:
    c, settings = served(doc)
    assert set(HEALTH_SERVICES) == {"", SERVICE_NAME}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[kind]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{kind} must be gRPC"
        assert probe["grpc"]["port"] == settings.grpc_port, kind
        assert probe["grpc"].get("service", "") in HEALTH_SERVICES, kind
    # The model service turns SERVING only once the model is loaded and warmed up.
    assert c["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    startup = c["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= MIN_STARTUP_S["gpu" if is_gpu(variant) else "cpu"]
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 3 * live["timeoutSeconds"]


@pytest.mark.parametrize(("variant", "doc"), reranker_cases())
def test_grace_period_exceeds_prestop_plus_drain(variant: str, doc: dict[str, Any]) -> None:
    c, settings = served(doc)
    spec = pod_spec(doc)
    grace = spec["terminationGracePeriodSeconds"]
    assert settings.drain_seconds > 0
    needed = prestop_seconds(c) + settings.drain_seconds + MARGIN_S
    if c in spec.get("initContainers", []):
        # Native sidecar: SIGTERM reaches it only after the main containers exited, same deadline.
        needed += OPENSEARCH_STOP_S
        assert "lifecycle" not in c, "a preStop sleep only delays a sidecar that already outlives OpenSearch"
    else:
        # Behind a Service: keep serving while the endpoint removal propagates, then drain.
        assert prestop_seconds(c) >= 3
    assert grace >= needed, f"terminationGracePeriodSeconds {grace} < {needed}"


@pytest.mark.parametrize(("variant", "doc"), reranker_cases())
def test_resources_and_thread_counts(variant: str, doc: dict[str, Any]) -> None:
    for c in containers(pod_spec(doc)):
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]), c["name"]
        assert "memory" in res["limits"], c["name"]
    c, _ = served(doc)
    res = c["resources"]
    assert res["limits"] == res["requests"], "a Guaranteed reranker: no CPU throttling surprises"
    for var in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS"):
        entry = next(e for e in c["env"] if e["name"] == var)
        assert entry["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"


@pytest.mark.parametrize(("variant", "doc"), reranker_cases())
def test_gpu_variants_request_a_gpu_and_cpu_variants_do_not(variant: str, doc: dict[str, Any]) -> None:
    c, settings = served(doc)
    spec = pod_spec(doc)
    if is_gpu(variant):
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert settings.device.startswith("cuda")
        assert c["image"] == render_module().GPU_IMAGE
    else:
        assert all("nvidia.com/gpu" not in str(x["resources"]) for x in containers(spec))
        assert "tolerations" not in spec
        assert settings.device == "cpu"
        assert c["image"] == render_module().CPU_IMAGE


@pytest.mark.parametrize(("variant", "doc"), reranker_cases())
def test_scrape_annotations_point_at_the_metrics_port(variant: str, doc: dict[str, Any]) -> None:
    _, settings = served(doc)
    annotations = doc["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == settings.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


# ---- security ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("variant", "docs"), cases())
def test_pods_meet_the_restricted_pod_security_standard(variant: str, docs: list[dict[str, Any]]) -> None:
    for doc in workloads(docs):
        spec = pod_spec(doc)
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert spec.get("automountServiceAccountToken") is False, where
        assert spec.get("enableServiceLinks") is False, f"{where}: service env vars could shadow RERANK_*"
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= PSA_VOLUMES, f"{where}: volume {volume['name']}"
        for c in containers(spec):
            sc = c.get("securityContext", {})
            name = f"{where}/{c['name']}"
            assert (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))) is True, name
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, name
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), name
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert not sc.get("privileged"), name
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), name
            assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, name
            assert all("hostPort" not in p for p in c.get("ports", [])), name


@pytest.mark.parametrize(("variant", "docs"), cases())
def test_image_containers_run_read_only_as_the_image_user(variant: str, docs: list[dict[str, Any]]) -> None:
    users = set()
    for path in DOCKERFILES.values():
        stages = parse_dockerfile(path)
        users.add(effective_instruction(stages, stages[-1].name, "USER"))
    assert len(users) == 1
    uid, _, gid = users.pop().partition(":")  # type: ignore[union-attr]
    for doc in workloads(docs):
        for c in containers(pod_spec(doc)):
            if c["name"] == "opensearch":
                continue
            sc = c["securityContext"]
            assert str(sc["runAsUser"]) == uid and str(sc["runAsGroup"]) == gid, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            # HOME, HF_HOME and torch's scratch files live in /tmp in the images.
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), c["name"]


def _network_policies_for(docs: list[dict[str, Any]], doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        p for p in docs if p["kind"] == "NetworkPolicy" and selects(p["spec"]["podSelector"], pod_labels(doc))
    ]


@pytest.mark.parametrize(("variant", "doc"), reranker_cases())
def test_network_policy_keeps_the_api_ports_private(variant: str, doc: dict[str, Any]) -> None:
    docs = VARIANTS[variant]
    _, settings = served(doc)
    spec = pod_spec(doc)
    policies = _network_policies_for(docs, doc)
    assert policies and all("Ingress" in p["spec"]["policyTypes"] for p in policies)
    opensearch_labels = pod_labels(find(docs, "StatefulSet", "opensearch"))
    api_ports = {settings.grpc_port, settings.http_port}
    metrics_opened = False
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("ports"), "a rule without ports opens every port, the API ones included"
            opened = {resolve_port(spec, p["port"]) for p in rule["ports"]}
            peers = rule.get("from", [])
            if opened & api_ports:
                # Only the shared shape opens its API, and only to OpenSearch pods of this namespace.
                assert doc["kind"] == "Deployment", "a native sidecar is reached over loopback only"
                assert peers and all(
                    set(peer) == {"podSelector"} and selects(peer["podSelector"], opensearch_labels)
                    for peer in peers
                )
            if settings.metrics_port in opened:
                metrics_opened = True
                assert peers and all(set(peer) == {"namespaceSelector"} for peer in peers)
    assert metrics_opened, "Prometheus must be able to scrape the metrics port"


@pytest.mark.parametrize(("variant", "docs"), cases())
def test_port_names_are_unique_per_pod_and_valid(variant: str, docs: list[dict[str, Any]]) -> None:
    for doc in workloads(docs):
        names = [p["name"] for c in containers(pod_spec(doc)) for p in c.get("ports", [])]
        assert len(names) == len(set(names)), names
        assert all(IANA_SVC_NAME.match(n) for n in names), names


# ---- wiring between objects ----------------------------------------------------------------------
@pytest.mark.parametrize(("variant", "docs"), cases())
def test_selectors_and_references_resolve(variant: str, docs: list[dict[str, Any]]) -> None:
    pods = workloads(docs)
    for doc in docs:
        kind = doc["kind"]
        if kind in ("Deployment", "StatefulSet"):
            assert selects(doc["spec"]["selector"], pod_labels(doc))
        if kind == "Service":
            targets = [p for p in pods if doc["spec"]["selector"].items() <= pod_labels(p).items()]
            assert targets, f"Service {doc['metadata']['name']} selects no pod"
            for port in doc["spec"]["ports"]:
                resolve_port(pod_spec(targets[0]), port["targetPort"])
        if kind in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = doc["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]
            assert any(selects(selector, pod_labels(p)) for p in pods), doc["metadata"]["name"]
        if kind == "HorizontalPodAutoscaler":
            target = doc["spec"]["scaleTargetRef"]
            scaled = find(docs, target["kind"], target["name"])
            assert "replicas" not in scaled["spec"], "re-applying would reset what the HPA decided"
    sts = find(docs, "StatefulSet", "opensearch")
    headless = find(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize(("variant", "docs"), cases())
def test_opensearch_cluster_formation_matches_replicas(variant: str, docs: list[dict[str, Any]]) -> None:
    sts = find(docs, "StatefulSet", "opensearch")
    env = env_values(next(c for c in pod_spec(sts)["containers"] if c["name"] == "opensearch"))
    n = sts["spec"]["replicas"]
    assert str(env["cluster.initial_cluster_manager_nodes"]).split(",") == [
        f"opensearch-{i}" for i in range(n)
    ]
    assert env["discovery.seed_hosts"] == sts["spec"]["serviceName"]


@pytest.mark.parametrize(("variant", "docs"), cases())
def test_installer_job_points_the_connector_at_the_right_sidecar(
    variant: str, docs: list[dict[str, Any]]
) -> None:
    job = find(docs, "Job", "rerank-installer")
    c = pod_spec(job)["containers"][0]
    args = c["args"]
    assert args[:2] == ["opensearch", "install"]
    opts = dict(zip(args[2::2], args[3::2], strict=False))
    service = find(docs, "Service", "opensearch")
    rest_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "rest")
    assert opts["--url"] == f"https://{service['metadata']['name']}:{rest_port}"
    if shape(variant) == "sidecar":
        sidecar = reranker(pod_spec(find(docs, "StatefulSet", "opensearch")))
        assert sidecar is not None
        port = settings_from_env(env_values(sidecar)).http_port
        assert opts["--sidecar-url"] == f"http://127.0.0.1:{port}"
    else:
        svc = find(docs, "Service", "reranker")
        http = next(p for p in svc["spec"]["ports"] if p["name"] == "http")
        deployment = find(docs, "Deployment", "reranker")
        served_port = settings_from_env(env_values(reranker(pod_spec(deployment)))).http_port  # type: ignore[arg-type]
        assert resolve_port(pod_spec(deployment), http["targetPort"]) == served_port
        assert opts["--sidecar-url"] == f"http://reranker.$(POD_NAMESPACE).svc:{http['port']}"
        namespace = next(e for e in c["env"] if e["name"] == "POD_NAMESPACE")
        assert namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # Credentials come from the Secret the OpenSearch nodes use, through env, never argv.
    node = next(x for x in pod_spec(find(docs, "StatefulSet", "opensearch"))["containers"])
    admin = next(e for e in node["env"] if e["name"] == "OPENSEARCH_INITIAL_ADMIN_PASSWORD")
    secret = admin["valueFrom"]["secretKeyRef"]["name"]
    creds = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in str(e)}
    assert creds == {"OPENSEARCH_USERNAME": secret, "OPENSEARCH_PASSWORD": secret}
    assert not any("PASSWORD" in a or "--password" in a for a in args)
    # The installer ships in the reranker image: one image to build and push.
    assert {c["image"]} == {reranker(pod_spec(d))["image"] for d in reranker_pods(docs)}  # type: ignore[index]


def _subcommand(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser | None:
    for name in names:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or name not in subs[0].choices:
            return None
        parser = subs[0].choices[name]
    return parser


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"`rerank-sidecar {' '.join(args)}` does not parse with the real CLI")


@pytest.mark.parametrize(("variant", "docs"), cases())
def test_container_arguments_parse_with_the_real_cli(variant: str, docs: list[dict[str, Any]]) -> None:
    from sidecar.cli import build_parser

    parser = build_parser()
    for doc in reranker_pods(docs):
        c = reranker(pod_spec(doc))
        assert c is not None
        assert _parse(parser, c["args"]).command == "serve"
    assert _subcommand(parser, "opensearch", "install") is not None, "the installer Job needs this command"
    job = pod_spec(find(docs, "Job", "rerank-installer"))["containers"][0]
    parsed = _parse(parser, job["args"])
    assert parsed.verify_certs is False
    assert parsed.sidecar_url == job["args"][job["args"].index("--sidecar-url") + 1]


def test_hpa_scales_on_a_metric_the_sidecar_exports() -> None:
    from sidecar.metrics import Metrics

    exported = {m.name for m in Metrics().registry.collect()}
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    rules = adapter["rules"]["custom"]
    for name, docs in VARIANTS.items():
        if shape(name) != "shared":
            continue
        hpa = find(docs, "HorizontalPodAutoscaler", "reranker")
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods"
        wanted = metric["pods"]["metric"]["name"]
        assert wanted in exported
        rule = next(r for r in rules if r["name"]["as"] == wanted)
        assert rule["seriesQuery"].startswith(wanted + "{")
        assert re.fullmatch(rule["name"]["matches"], wanted)
        assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
        assert hpa["spec"]["minReplicas"] >= 2, "one pod left during a rollout or eviction is no redundancy"
        pdb = find(docs, "PodDisruptionBudget", "reranker")
        assert pdb["spec"].get("maxUnavailable", 0) < hpa["spec"]["minReplicas"]


def test_commented_base_files_are_exactly_what_the_default_shapes_ship() -> None:
    """The annotated sources in base/ must not disagree with the renders people apply."""
    r = render_module()
    assert r.render(r.Options()) == r.load("opensearch.yaml") + r.load("installer-job.yaml")
    shared = r.render(r.Options(shape="shared"))
    for doc in r.load("reranker-shared.yaml"):
        assert doc in shared, f"{doc['kind']}/{doc['metadata']['name']} differs in the shared render"
