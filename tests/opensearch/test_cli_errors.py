"""`rerank-sidecar opensearch ...` meets a cluster it cannot use: one line that says what happened and what
to do, exit 2, no traceback (unless --log-level DEBUG). Run as real subprocesses of the real CLI."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest


def _closed_port() -> int:
    """A loopback port nothing listens on: bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "opensearch", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ["search", "--index", "docs", "--query", "q"],
        ["index", "--index", "docs", "--corpus", "tests/data/missing-corpus-is-not-reached"],
        ["install", "--no-smoke-test"],
        ["uninstall"],
    ],
    ids=["search", "index", "install", "uninstall"],
)
def test_an_unreachable_cluster_is_one_line(command: list[str]) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    line = _one_line(_cli(*command, "--url", url))
    assert f"cannot reach OpenSearch at {url} (connection refused)" in line
    assert "opensearch node start" in line and "OPENSEARCH_URL" in line


def test_debug_keeps_the_traceback() -> None:
    r = _cli(
        "search",
        "--index",
        "docs",
        "--query",
        "q",
        "--url",
        f"http://127.0.0.1:{_closed_port()}",
        "--log-level",
        "DEBUG",
    )
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "ConnectionError" in r.stderr


@pytest.fixture(scope="module")
def osmem() -> Iterator[Any]:
    osmem_server = pytest.importorskip("osmem_server")
    with osmem_server.OsmemServer.start(japanese=False) as server:
        yield server


def test_a_missing_index_is_one_line(osmem: Any) -> None:
    line = _one_line(_cli("search", "--url", osmem.url, "--index", "no-such-index", "--query", "q"))
    assert "index 'no-such-index' does not exist" in line
    assert "rerank-sidecar opensearch index --index no-such-index" in line
