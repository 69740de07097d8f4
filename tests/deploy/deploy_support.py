"""What the deployment tests share: the renderer, the rendered manifests, Dockerfile parsing, and the
sidecar's own settings, read from the code so the manifests cannot drift from what the server does."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shlex
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from sidecar.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile", "cuda": DEPLOY / "docker" / "Dockerfile.cuda"}
# The stated Kubernetes version: native sidecars (restartable init containers) are on by default from
# 1.29. Manifests are also checked against the newest schema kubernetes-validate bundles.
K8S_VERSION = "1.29"
POD_WORKLOADS = ("StatefulSet", "Deployment", "Job", "DaemonSet")


@functools.cache
def render_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_render", DEPLOY / "render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def variants() -> dict[str, list[dict[str, Any]]]:
    """Every committed variant, freshly rendered (variant name -> documents)."""
    r = render_module()
    return {name.removesuffix(".yaml"): r.render(options) for name, options in r.VARIANTS.items()}


def is_gpu(variant: str) -> bool:
    return render_module().VARIANTS[variant + ".yaml"].gpu


def shape(variant: str) -> str:
    return str(render_module().VARIANTS[variant + ".yaml"].shape)


# ---- manifests ---------------------------------------------------------------------------------
def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in POD_WORKLOADS]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"].get("labels", {})


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec.get("containers", [])


def reranker(spec: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in containers(spec) if c["name"] == "reranker"), None)


def reranker_pods(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in workloads(docs) if reranker(pod_spec(d))]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "these tests only understand matchLabels selectors"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def env_values(container: dict[str, Any]) -> dict[str, str | None]:
    """Plain `value` entries (valueFrom entries map to None)."""
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def container_port(container: dict[str, Any], name: str) -> int:
    hits = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == name]
    assert len(hits) == 1, f"container {container['name']} has no single port named {name!r}"
    return int(hits[0])


def resolve_port(spec: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    hits = [p["containerPort"] for c in containers(spec) for p in c.get("ports", []) if p.get("name") == port]
    assert len(hits) == 1, f"named port {port!r} is not defined exactly once in the pod"
    return int(hits[0])


def prestop_seconds(container: dict[str, Any]) -> float:
    pre = container.get("lifecycle", {}).get("preStop")
    if not pre:
        return 0.0
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = pre.get("exec", {}).get("command", [])
    assert len(command) == 2 and command[0] == "sleep", f"preStop must be a plain sleep, got {pre}"
    return float(command[1])


# ---- the sidecar's settings --------------------------------------------------------------------
@contextlib.contextmanager
def rerank_env(values: Mapping[str, str]) -> Iterator[None]:
    """os.environ with exactly these RERANK_* variables (the test runner's own ones set aside)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    for k in saved:
        del os.environ[k]
    os.environ.update(values)
    try:
        yield
    finally:
        for k in values:
            os.environ.pop(k, None)
        os.environ.update(saved)


def settings_from_env(env: Mapping[str, str | None]) -> Settings:
    """The Settings the sidecar builds from these RERANK_* variables, read the way it reads them."""
    given: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        assert name[len(ENV_PREFIX) :].lower() in Settings.model_fields, (
            f"{name} is not a setting of the sidecar"
        )
        assert value is not None, f"{name} must be a literal value"
        given[name] = value
    with rerank_env(given):
        return Settings()  # type: ignore[call-arg]


def default_settings() -> Settings:
    return settings_from_env({})


# ---- Dockerfiles ---------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                out[key] = value
        return out


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages in order, each with its (KEYWORD, arguments) instructions; continuations joined."""
    logical: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args.strip(), flags=re.IGNORECASE)
            assert m, f"cannot parse FROM {args}"
            stages.append(Stage(name=(m.group(2) or str(len(stages))).lower(), base=m.group(1)))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def stage(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


def effective_env(stages: list[Stage], name: str) -> dict[str, str]:
    """ENV of a stage including what it inherits from the stages it is built FROM."""
    s = stage(stages, name)
    inherited = effective_env(stages, s.base.lower()) if any(x.name == s.base.lower() for x in stages) else {}
    return inherited | s.env()


def effective_instruction(stages: list[Stage], name: str, keyword: str) -> str | None:
    """The last KEYWORD instruction in force for a stage, following FROM <stage> chains."""
    s = stage(stages, name)
    own = s.all(keyword)
    if own:
        return own[-1]
    if any(x.name == s.base.lower() for x in stages):
        return effective_instruction(stages, s.base.lower(), keyword)
    return None


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches a path's parents."""
    import fnmatch

    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        regex = fnmatch.translate(pat).replace(".*", "[^/]*")
        if pat.startswith("**/"):
            regex = "(?:.*/)?" + fnmatch.translate(pat[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
