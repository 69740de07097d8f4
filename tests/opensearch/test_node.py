"""`rerank-sidecar opensearch node` without the network: what it builds from, and its one-line failures.
Starting a real node is covered by the `opensearch_url` fixture (tests/opensearch/conftest.py) and .ci/run."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.launch import free_port
from sidecar.opensearch import node


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "opensearch", "node", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_the_artifacts_are_the_published_coordinates() -> None:
    coords = [a.coords for a in node.artifacts(node.RELEASES["2.19.1"])]
    assert coords == [
        "org.opensearch.distribution.integ-test-zip:opensearch:2.19.1:zip",
        "org.opensearch.plugin:opensearch-job-scheduler:2.19.1.0:zip",
        "org.opensearch.plugin:opensearch-ml-plugin:2.19.1.0:zip",
        "org.opensearch.plugin:opensearch-knn:2.19.1.0:zip",
        "org.opensearch.plugin:neural-search:2.19.1.0:zip",
        "org.opensearch.plugin:lang-painless:2.19.1:jar",
        "org.opensearch.plugin:analysis-common:2.19.1:jar",
        "org.opensearch.plugin:search-pipeline-common:2.19.2:jar",
    ]


def test_module_descriptors_claim_the_core_version_and_extend_painless() -> None:
    release = node.RELEASES["2.19.1"]
    by_name = {m.name: m for m in release.modules}
    text = node._descriptor(release, by_name["analysis-common"], 17)
    props = dict(line.split("=", 1) for line in text.splitlines())
    assert props["opensearch.version"] == "2.19.1" and props["extended.plugins"] == "lang-painless"
    assert props["classname"] == "org.opensearch.analysis.common.CommonAnalysisPlugin"
    assert "createClassLoader" in by_name["lang-painless"].policy


def test_no_jdk_in_range_is_one_clear_error() -> None:
    release = dataclasses.replace(node.RELEASES["2.19.1"], java=(90, 99))
    with pytest.raises(node.NodeError, match=r"needs a JDK 90-99 .*OPENSEARCH_JAVA_HOME"):
        node.find_java(release)


def test_a_jdk_17_is_found_for_2_19() -> None:
    if not any(p.name.startswith(("java-17", "openjdk-17")) for p in Path("/usr/lib/jvm").glob("*")):
        pytest.skip("no JDK 17 under /usr/lib/jvm")
    assert node._java_major(node.find_java(node.RELEASES["2.19.1"])) == 17


def test_start_without_maven_and_nothing_cached_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": "/nonexistent", "RERANK_CACHE_DIR": str(tmp_path)}
    r = _cli("start", "--port", str(free_port()), "--home", str(tmp_path / "home"), env=env)
    assert r.returncode == 2, r.stderr
    assert (
        r.stderr.strip()
        == "error: Maven (mvn) is needed to download OpenSearch: install it (apt-get install maven)"
    )


def test_status_of_a_port_with_no_node() -> None:
    port = free_port()
    r = _cli("status", "--port", str(port))
    assert r.returncode == 1 and r.stdout.strip() == f"no OpenSearch answers on 127.0.0.1:{port}"
