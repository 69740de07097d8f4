"""deploy/render.py: the options people use render valid manifests that do what the option says."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    DEPLOY,
    K8S_VERSION,
    env_values,
    find,
    pod_spec,
    render_module,
    reranker,
    settings_from_env,
)

r = render_module()


def rendered(*argv: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    assert r.main(list(argv)) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    return docs


def sidecar_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    c = reranker(pod_spec(find(docs, "StatefulSet", "opensearch")))
    assert c is not None
    return c


def test_runs_as_a_standalone_script() -> None:
    """Users run it outside the project: no import of the package, only PyYAML."""
    out = subprocess.run(
        [sys.executable, str(DEPLOY / "render.py"), "sidecar"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out == r.dump(r.render(r.Options()), r.Options())
    assert subprocess.run([sys.executable, str(DEPLOY / "render.py"), "--check"], timeout=60).returncode == 0


def test_header_names_the_command_that_reproduces_the_file() -> None:
    o = r.Options(shape="shared", gpu=True, replicas=1, image="registry.example/reranker:1")
    assert r.command_line(o) == "shared --gpu --image registry.example/reranker:1 --replicas 1"
    assert r.options_from_args(r.build_parser().parse_args(r.command_line(o).split())) == o


def test_image_and_opensearch_image(capsys: pytest.CaptureFixture[str]) -> None:
    docs = rendered(
        "sidecar", "--image", "reg.example/rr:1", "--opensearch-image", "os:2.19.2", capsys=capsys
    )
    assert sidecar_of(docs)["image"] == "reg.example/rr:1"
    assert pod_spec(find(docs, "Job"))["containers"][0]["image"] == "reg.example/rr:1"
    assert pod_spec(find(docs, "StatefulSet"))["containers"][0]["image"] == "os:2.19.2"


def test_model_from_a_volume_claim(capsys: pytest.CaptureFixture[str]) -> None:
    docs = rendered("sidecar", "--model-pvc", "reranker-model", capsys=capsys)
    spec = pod_spec(find(docs, "StatefulSet"))
    c = sidecar_of(docs)
    assert {
        "name": "model",
        "persistentVolumeClaim": {"claimName": "reranker-model", "readOnly": True},
    } in spec["volumes"]
    assert {"name": "model", "mountPath": r.MODEL_DIR, "readOnly": True} in c["volumeMounts"]
    assert settings_from_env(env_values(c)).model == r.MODEL_DIR


def test_hub_model_goes_online(capsys: pytest.CaptureFixture[str]) -> None:
    docs = rendered("shared", "--model", "BAAI/bge-reranker-base", capsys=capsys)
    c = reranker(pod_spec(find(docs, "Deployment", "reranker")))
    assert c is not None
    assert env_values(c)["HF_HUB_OFFLINE"] == "0"
    assert settings_from_env(env_values(c)).model == "BAAI/bge-reranker-base"
    local = rendered("shared", "--model", "/models/other", capsys=capsys)
    assert "HF_HUB_OFFLINE" not in env_values(reranker(pod_spec(find(local, "Deployment"))))  # type: ignore[arg-type]


def test_single_node_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    docs = rendered("sidecar", "--replicas", "1", capsys=capsys)
    sts = find(docs, "StatefulSet")
    env = env_values(pod_spec(sts)["containers"][0])
    assert sts["spec"]["replicas"] == 1
    assert env["discovery.type"] == "single-node"
    assert "cluster.initial_cluster_manager_nodes" not in env and "discovery.seed_hosts" not in env
    five = env_values(
        pod_spec(find(rendered("sidecar", "--replicas", "5", capsys=capsys), "StatefulSet"))["containers"][0]
    )
    assert five["cluster.initial_cluster_manager_nodes"] == ",".join(f"opensearch-{i}" for i in range(5))


def test_monitoring_namespace_and_installer_options(capsys: pytest.CaptureFixture[str]) -> None:
    docs = rendered(
        "shared",
        "--monitoring-namespace",
        "observability",
        "--index",
        "articles",
        "--fields",
        "body",
        "--opensearch-url",
        "https://search.example:9200",
        capsys=capsys,
    )
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        for rule in policy["spec"]["ingress"]:
            for peer in rule.get("from", []):
                if "namespaceSelector" in peer:
                    assert peer["namespaceSelector"]["matchLabels"] == {
                        "kubernetes.io/metadata.name": "observability"
                    }
    args = pod_spec(find(docs, "Job"))["containers"][0]["args"]
    assert args[args.index("--index") + 1] == "articles"
    assert args[args.index("--fields") + 1] == "body"
    assert args[args.index("--url") + 1] == "https://search.example:9200"


def test_gpu_shared_shape_scales_on_a_deeper_queue() -> None:
    cpu = find(r.render(r.Options(shape="shared")), "HorizontalPodAutoscaler")
    gpu = find(r.render(r.Options(shape="shared", gpu=True)), "HorizontalPodAutoscaler")
    target = lambda hpa: float(hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"])  # noqa: E731
    assert target(gpu) > target(cpu)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["mesh"],
        ["sidecar", "--write"],
        ["sidecar", "--replicas", "0"],
        ["sidecar", "--model", "a", "--model-pvc", "b"],
    ],
)
def test_bad_invocations_fail_with_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        r.main(argv)
    assert exc.value.code == 2
