#!/usr/bin/env python3
"""Render the Kubernetes manifests of one deployment shape, or refresh the committed renders.

    python deploy/render.py sidecar [--gpu] [--image IMAGE] [...] | kubectl -n search apply -f -
    python deploy/render.py --write   # after editing deploy/kubernetes/base/: regenerate rendered/
    python deploy/render.py --check   # exit 1 when deploy/kubernetes/rendered/ is stale (CI)

Shapes, built from the plain manifests in deploy/kubernetes/base/:
  sidecar  OpenSearch StatefulSet whose pods run the reranker as a native sidecar, and the installer
           Job pointing the connector at the pod-local sidecar (http://127.0.0.1:8080).
  shared   the same OpenSearch without the sidecar, a reranker Deployment + Service + HPA + PDB +
           NetworkPolicy, and the installer Job pointing the connector at the Service.
--gpu swaps in the CUDA image, requests one nvidia.com/gpu, tolerates the usual GPU node taint and
gives the model longer to load. Needs Python 3.11+ and PyYAML (`pip install pyyaml`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path
from typing import Any

try:
    import yaml
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("deploy/render.py needs PyYAML: pip install pyyaml")

HERE = Path(__file__).resolve().parent
BASE = HERE / "kubernetes" / "base"
RENDERED = HERE / "kubernetes" / "rendered"

CPU_IMAGE = "rerank-sidecar:0.1.0"
GPU_IMAGE = "rerank-sidecar:0.1.0-cuda"
MODEL_DIR = "/models/reranker"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# A GPU reranker: bigger batches pay off (see RERANK_MAX_BATCH_TOKENS), and CPU cores are still needed
# for tokenization. Requests equal limits, as the device plugin requires for nvidia.com/gpu.
GPU_ENV = {"RERANK_DEVICE": "cuda", "RERANK_MAX_BATCH_TOKENS": "16384"}
GPU_RESOURCES = {
    "requests": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"},
    "limits": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"},
}
# x 5 s: CUDA initialisation, larger models and first kernel compilations load slower than on CPU.
GPU_STARTUP_FAILURE_THRESHOLD = 120
# Queue target per GPU pod: one GPU scores thousands of pairs/s, so a deeper queue is still short.
GPU_HPA_QUEUE_TARGET = "1000"


@dataclasses.dataclass(frozen=True)
class Options:
    shape: str = "sidecar"
    gpu: bool = False
    image: str | None = None
    opensearch_image: str | None = None
    replicas: int | None = None
    monitoring_namespace: str = "monitoring"
    model: str | None = None
    model_pvc: str | None = None
    opensearch_url: str = "https://opensearch:9200"
    index: str = "docs"
    fields: str = "title,text"


SHAPES = ("sidecar", "shared")
# The committed renders (deploy/kubernetes/rendered/): defaults only, applicable without Python.
VARIANTS = {
    "sidecar.yaml": Options(),
    "sidecar-gpu.yaml": Options(gpu=True),
    "shared.yaml": Options(shape="shared"),
    "shared-gpu.yaml": Options(shape="shared", gpu=True),
}


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((BASE / name).read_text()) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise KeyError(f"{kind}/{name} is not in the base manifests")


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        if c["name"] == name:
            return c
    raise KeyError(f"no container {name!r}")


def set_env(c: dict[str, Any], name: str, value: str) -> None:
    env = c.setdefault("env", [])
    for entry in env:
        if entry["name"] == name:
            entry.clear()
            entry.update(name=name, value=value)
            return
    env.append({"name": name, "value": value})


def remove_env(c: dict[str, Any], name: str) -> None:
    c["env"] = [e for e in c.get("env", []) if e["name"] != name]


def set_arg(c: dict[str, Any], flag: str, value: str) -> None:
    args = c["args"]
    args[args.index(flag) + 1] = value


def port(c: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def configure_reranker(spec: dict[str, Any], o: Options) -> None:
    c = container(spec, "reranker")
    c["image"] = image(o)
    if o.gpu:
        for name, value in GPU_ENV.items():
            set_env(c, name, value)
        c["resources"] = copy.deepcopy(GPU_RESOURCES)
        c["startupProbe"]["failureThreshold"] = GPU_STARTUP_FAILURE_THRESHOLD
        tolerations = spec.setdefault("tolerations", [])
        if GPU_TOLERATION not in tolerations:
            tolerations.append(dict(GPU_TOLERATION))
    if o.model_pvc:
        spec.setdefault("volumes", []).append(
            {"name": "model", "persistentVolumeClaim": {"claimName": o.model_pvc, "readOnly": True}}
        )
        c.setdefault("volumeMounts", []).append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})
        set_env(c, "RERANK_MODEL", MODEL_DIR)
    elif o.model:
        set_env(c, "RERANK_MODEL", o.model)
        if not o.model.startswith("/"):
            # A hub id downloads at start: the images default to offline (HF_HUB_OFFLINE=1).
            set_env(c, "HF_HUB_OFFLINE", "0")


def configure_opensearch(docs: list[dict[str, Any]], o: Options) -> None:
    sts = find(docs, "StatefulSet", "opensearch")
    spec = pod_spec(sts)
    node = container(spec, "opensearch")
    if o.opensearch_image:
        node["image"] = o.opensearch_image
    replicas = o.replicas or sts["spec"]["replicas"]
    sts["spec"]["replicas"] = replicas
    if replicas == 1:
        # A one-node cluster must not name initial cluster managers or seed hosts.
        remove_env(node, "cluster.initial_cluster_manager_nodes")
        remove_env(node, "discovery.seed_hosts")
        set_env(node, "discovery.type", "single-node")
    else:
        name = sts["metadata"]["name"]
        set_env(
            node, "cluster.initial_cluster_manager_nodes", ",".join(f"{name}-{i}" for i in range(replicas))
        )
    if o.shape == "sidecar":
        configure_reranker(spec, o)
        return
    # shared: the nodes lose their sidecar, its volume, its scrape annotations and its NetworkPolicy rule.
    spec["initContainers"] = [c for c in spec["initContainers"] if c["name"] != "reranker"]
    if not spec["initContainers"]:
        del spec["initContainers"]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "reranker-tmp"]
    if not spec["volumes"]:
        del spec["volumes"]
    annotations = sts["spec"]["template"]["metadata"].get("annotations", {})
    for key in [k for k in annotations if k.startswith("prometheus.io/")]:
        del annotations[key]
    if not annotations:
        sts["spec"]["template"]["metadata"].pop("annotations", None)
    policy = find(docs, "NetworkPolicy", "opensearch")
    policy["spec"]["ingress"] = [
        rule for rule in policy["spec"]["ingress"] if {"port": "metrics"} not in rule.get("ports", [])
    ]


def image(o: Options) -> str:
    return o.image or (GPU_IMAGE if o.gpu else CPU_IMAGE)


def render(o: Options) -> list[dict[str, Any]]:
    if o.shape not in SHAPES:
        raise ValueError(f"unknown shape {o.shape!r}; choose one of {', '.join(SHAPES)}")
    if o.replicas is not None and o.replicas < 1:
        raise ValueError("--replicas must be at least 1")
    docs = load("opensearch.yaml")
    configure_opensearch(docs, o)
    sts_spec = pod_spec(find(docs, "StatefulSet", "opensearch"))
    if o.shape == "sidecar":
        sidecar_url = f"http://127.0.0.1:{port(container(sts_spec, 'reranker'), 'http')}"
    else:
        shared = load("reranker-shared.yaml")
        configure_reranker(pod_spec(find(shared, "Deployment", "reranker")), o)
        if o.gpu:
            hpa = find(shared, "HorizontalPodAutoscaler", "reranker")
            hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = GPU_HPA_QUEUE_TARGET
        service = find(shared, "Service", "reranker")
        http_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
        # $(POD_NAMESPACE) is expanded by the kubelet from the Job's downward-API env var.
        sidecar_url = f"http://{service['metadata']['name']}.$(POD_NAMESPACE).svc:{http_port}"
        docs += shared
    job = load("installer-job.yaml")
    installer = container(pod_spec(find(job, "Job", "rerank-installer")), "installer")
    installer["image"] = image(o)
    set_arg(installer, "--url", o.opensearch_url)
    set_arg(installer, "--sidecar-url", sidecar_url)
    set_arg(installer, "--index", o.index)
    set_arg(installer, "--fields", o.fields)
    docs += job
    for doc in docs:
        if doc["kind"] == "NetworkPolicy":
            for rule in doc["spec"]["ingress"]:
                for peer in rule.get("from", []):
                    labels = peer.get("namespaceSelector", {}).get("matchLabels", {})
                    if "kubernetes.io/metadata.name" in labels:
                        labels["kubernetes.io/metadata.name"] = o.monitoring_namespace
    return docs


def command_line(o: Options) -> str:
    """The render.py invocation that reproduces `o` (for the header of generated files)."""
    parts = [o.shape]
    defaults = Options(shape=o.shape)
    for f in dataclasses.fields(Options):
        value = getattr(o, f.name)
        if f.name == "shape" or value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def dump(docs: list[dict[str, Any]], o: Options) -> str:
    header = (
        f"# Generated by `python deploy/render.py {command_line(o)}` from deploy/kubernetes/base/\n"
        "# (the commented sources). Do not edit: change the base files, then run\n"
        "# `python deploy/render.py --write`.\n"
    )
    body = "---\n".join(yaml.safe_dump(doc, sort_keys=False, width=1000) for doc in docs)
    return header + body


def stale() -> list[str]:
    """Committed renders that differ from what the base files render to (or that should not exist)."""
    out = []
    for name, o in VARIANTS.items():
        path = RENDERED / name
        if not path.exists() or path.read_text() != dump(render(o), o):
            out.append(name)
    extra = {p.name for p in RENDERED.glob("*.yaml")} - set(VARIANTS)
    return out + sorted(extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python deploy/render.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("shape", nargs="?", choices=SHAPES, help="deployment shape")
    parser.add_argument("--gpu", action="store_true", help="CUDA image, one nvidia.com/gpu per reranker")
    parser.add_argument("--image", help=f"reranker image (default {CPU_IMAGE}, with --gpu {GPU_IMAGE})")
    parser.add_argument(
        "--opensearch-image", help="OpenSearch image (default: the one in base/opensearch.yaml)"
    )
    parser.add_argument("--replicas", type=int, help="OpenSearch nodes (default 3; 1 = single-node cluster)")
    parser.add_argument(
        "--monitoring-namespace", default="monitoring", help="namespace allowed to scrape metrics"
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="RERANK_MODEL: a directory in the image, or a hub id (goes online)")
    model.add_argument("--model-pvc", help=f"PersistentVolumeClaim holding the model, mounted at {MODEL_DIR}")
    parser.add_argument("--opensearch-url", default=Options.opensearch_url, help="what the installer calls")
    parser.add_argument("--index", default=Options.index, help="index whose searches get reranked")
    parser.add_argument("--fields", default=Options.fields, help="comma-separated document fields to rerank")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="regenerate deploy/kubernetes/rendered/")
    mode.add_argument("--check", action="store_true", help="exit 1 if deploy/kubernetes/rendered/ is stale")
    return parser


def options_from_args(args: argparse.Namespace) -> Options:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Options) if f.name != "shape"}
    return Options(shape=args.shape, **given)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.write or args.check:
        if args.shape:
            parser.error("--write and --check take no shape: they cover every committed variant")
        if args.check:
            bad = stale()
            for name in bad:
                print(f"stale: deploy/kubernetes/rendered/{name} (run python deploy/render.py --write)")
            return 1 if bad else 0
        RENDERED.mkdir(parents=True, exist_ok=True)
        for extra in RENDERED.glob("*.yaml"):
            if extra.name not in VARIANTS:
                extra.unlink()
        for name, o in VARIANTS.items():
            (RENDERED / name).write_text(dump(render(o), o))
        return 0
    if not args.shape:
        parser.error("name a shape (sidecar or shared), or use --write / --check")
    options = options_from_args(args)
    try:
        sys.stdout.write(dump(render(options), options))
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
