"""docs/deploy.md: the commands it gives refer to files, stages, options and names that exist."""

from __future__ import annotations

import re
import shlex

from deploy_support import (
    DEPLOY,
    DOCKERFILES,
    ROOT,
    default_settings,
    find,
    parse_dockerfile,
    pod_spec,
    render_module,
)

DOC = (ROOT / "docs" / "deploy.md").read_text()


def commands(prefix: str) -> list[list[str]]:
    """Shell commands in the doc starting with `prefix`, continuation lines joined, up to a pipe."""
    text = re.sub(r"\\\n\s*", " ", DOC)
    out = []
    for line in text.splitlines():
        line = line.strip().strip("`")
        at = line.find(prefix)
        if at < 0:
            continue
        command = line[at:].split(" | ")[0].split("`")[0]
        out.append(shlex.split(command.replace("$REGISTRY", "registry.example")))
    return out


def test_paths_named_in_the_doc_exist() -> None:
    paths = set(re.findall(r"`?(deploy/[\w./-]+\w)", DOC))
    assert paths
    for path in paths:
        assert (ROOT / path).exists(), path


def test_render_commands_parse() -> None:
    found = commands("python deploy/render.py")
    assert len(found) >= 4
    parser = render_module().build_parser()
    for argv in found:
        args = parser.parse_args(argv[2:])
        assert args.shape or args.write or args.check, argv


def test_docker_build_commands_name_real_files_and_stages() -> None:
    found = commands("docker build")
    assert {
        DOCKERFILES["cpu"].relative_to(ROOT).as_posix(),
        DOCKERFILES["cuda"].relative_to(ROOT).as_posix(),
    } <= {argv[argv.index("-f") + 1] for argv in found}
    for argv in found:
        assert argv[-1] == ".", "the repository root is the build context"
        stages = {s.name for s in parse_dockerfile(ROOT / argv[argv.index("-f") + 1])}
        if "--target" in argv:
            assert argv[argv.index("--target") + 1] in stages
    for target in re.findall(r"--target (\w+)", DOC):
        assert all(target in {s.name for s in parse_dockerfile(p)} for p in DOCKERFILES.values()), target
    args = set(re.findall(r"--build-arg (\w+)=", DOC))
    declared = set(re.findall(r"ARG (\w+)", DOCKERFILES["cpu"].read_text() + DOCKERFILES["cuda"].read_text()))
    assert args <= declared, args - declared


def test_docker_run_commands_publish_a_reachable_read_only_sidecar() -> None:
    for argv in commands("docker run"):
        assert "--read-only" in argv and "--tmpfs" in argv
        assert "RERANK_HOST=0.0.0.0" in argv, "a loopback bind inside the container cannot be published"
        stop = int(argv[argv.index("--stop-timeout") + 1])
        assert stop > default_settings().drain_seconds


def test_names_match_the_manifests() -> None:
    docs = render_module().render(render_module().Options())
    node = pod_spec(find(docs, "StatefulSet", "opensearch"))["containers"][0]
    secret = next(e for e in node["env"] if e["name"] == "OPENSEARCH_INITIAL_ADMIN_PASSWORD")
    assert f"secret generic {secret['valueFrom']['secretKeyRef']['name']}" in DOC
    for kind, name in (("StatefulSet", "opensearch"), ("Job", "rerank-installer")):
        find(docs, kind, name)
        assert f"{kind.lower()}/{name}" in DOC
    adapter = (DEPLOY / "prometheus-adapter" / "values.yaml").read_text()
    assert re.search(r"seriesQuery: '(.+)'", adapter).group(1) in DOC  # type: ignore[union-attr]


def test_pipeline_names_match_the_installer() -> None:
    from sidecar.opensearch import templates

    cfg = templates.PluginConfig()
    for kind in templates.KINDS:
        assert templates.pipeline_name(cfg, kind) in DOC
    assert f"search_pipeline={templates.pipeline_name(cfg, 'rerank')}" in DOC
