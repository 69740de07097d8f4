"""Installer and pipelines against a real OpenSearch cluster (2.19+ / 3.x with ml-commons and neural-search).

Skipped unless OPENSEARCH_URL is set. Credentials: OPENSEARCH_USERNAME / OPENSEARCH_PASSWORD; a self-signed
test cluster: OPENSEARCH_VERIFY_CERTS=false. The cluster must reach the sidecar: either set
RERANK_SIDECAR_URL to a sidecar you run, or let the test start one on 0.0.0.0 and tell it the address the
cluster sees this machine at with RERANK_SIDECAR_HOST (e.g. host.docker.internal; default 127.0.0.1, right
when OpenSearch runs with --network host). See docs/opensearch.md for a one-line docker command.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.opensearch import templates as T
from sidecar.opensearch.connection import ConnectionOptions
from sidecar.opensearch.indexer import index_beir_corpus
from sidecar.opensearch.installer import Installer
from tests.conftest import SCIFACT
from tests.opensearch.conftest import post_json

pytestmark = [
    pytest.mark.opensearch,
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("OPENSEARCH_URL"), reason="set OPENSEARCH_URL to run against a cluster"
    ),
]

INDEX = "rerank-sidecar-test-scifact"
NAME = "rerank-sidecar-test"
QUERY = "white matter development in newborn brains measured by diffusion MRI"


@pytest.fixture(scope="module")
def client() -> Any:
    verify = os.environ.get("OPENSEARCH_VERIFY_CERTS", "true").lower() not in ("0", "false", "no")
    return ConnectionOptions.from_env(
        verify_certs=verify, ca_certs=os.environ.get("OPENSEARCH_CA_CERTS")
    ).connect()


@pytest.fixture(scope="module")
def sidecar_url() -> Iterator[str]:
    given = os.environ.get("RERANK_SIDECAR_URL")
    if given:
        yield given
        return
    from sidecar.launch import SidecarProcess

    with SidecarProcess(["--host", "0.0.0.0", "--max-length", "128"]) as sc:
        host = os.environ.get("RERANK_SIDECAR_HOST", "127.0.0.1")
        yield f"http://{host}:{sc.http_port}"


@pytest.fixture(scope="module")
def cfg(sidecar_url: str) -> T.PluginConfig:
    return T.PluginConfig(sidecar_url=sidecar_url, fields=("passage",), name=NAME, read_timeout_s=30)


@pytest.fixture(scope="module")
def index(client: Any) -> str:
    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip("SciFact is not beside the repo")
    index_beir_corpus(client, INDEX, SCIFACT, limit=500, recreate=True)
    return INDEX


@pytest.fixture(scope="module")
def installed(client: Any, cfg: T.PluginConfig, index: str) -> Iterator[Installer]:
    installer = Installer(client, cfg, log=lambda _: None)
    installer.install(index=index)
    yield installer
    installer.uninstall()
    client.indices.delete(index=index, ignore=[404])


def _sidecar_order(sidecar_url: str, query: str, hits: list[dict]) -> list[str]:
    local = sidecar_url.replace(os.environ.get("RERANK_SIDECAR_HOST", "127.0.0.1"), "127.0.0.1")
    reply = post_json(
        local, "/v1/opensearch/scores", {"query": query, "documents": [h["_source"]["passage"] for h in hits]}
    )
    scores = reply.json()["scores"]
    return [hits[i]["_id"] for i in sorted(range(len(hits)), key=lambda i: -scores[i])]


def test_install_is_idempotent(client: Any, installed: Installer, index: str) -> None:
    second = installed.install(index=index)
    actions = {(s.what, s.name): s.action for s in second.steps}
    for (what, name), action in actions.items():
        if what in ("connector", "model", "model group", "search pipeline", "cluster settings"):
            assert action == "unchanged", (what, name, action)
    for kind in T.KINDS:
        assert len(installed._find("connectors", T.connector_name(installed.cfg, kind))) == 1
        assert len(installed._find("models", T.model_name(installed.cfg, kind))) == 1
    assert len(installed._find("model_groups", T.model_group_name(installed.cfg))) == 1


def test_search_through_the_rerank_pipeline(
    client: Any, installed: Installer, index: str, sidecar_url: str
) -> None:
    cfg = installed.cfg
    plain = client.search(index=index, body={"size": 10, "query": {"match": {"passage": QUERY}}})["hits"][
        "hits"
    ]
    body = T.search_body(cfg, "rerank", QUERY, size=10)
    got = client.search(index=index, body=body, params={"search_pipeline": T.pipeline_name(cfg, "rerank")})
    hits = got["hits"]["hits"]
    assert {h["_id"] for h in hits} == {h["_id"] for h in plain}
    assert [h["_score"] for h in hits] == sorted((h["_score"] for h in hits), reverse=True)
    assert [h["_id"] for h in hits] == _sidecar_order(sidecar_url, QUERY, plain)


def test_search_through_the_by_field_pipeline(
    client: Any, installed: Installer, index: str, sidecar_url: str
) -> None:
    cfg = installed.cfg
    plain = client.search(index=index, body={"size": 10, "query": {"match": {"passage": QUERY}}})["hits"][
        "hits"
    ]
    body = T.search_body(cfg, "by_field", QUERY, size=10)
    got = client.search(index=index, body=body, params={"search_pipeline": T.pipeline_name(cfg, "by_field")})
    hits = got["hits"]["hits"]
    assert [h["_id"] for h in hits] == _sidecar_order(sidecar_url, QUERY, plain)
    first_stage = {h["_id"]: h["_score"] for h in plain}
    for h in hits:
        assert abs(h["_source"]["previous_score"] - first_stage[h["_id"]]) < 1e-4
        assert cfg.target_field not in h["_source"]


def test_oversample_reranks_a_deeper_window(
    client: Any, cfg: T.PluginConfig, index: str, sidecar_url: str
) -> None:
    deep = dataclasses.replace(cfg, name=NAME + "-deep", sample_factor=3.0)
    installer = Installer(client, deep.with_version(cfg.opensearch_version), log=lambda _: None)
    try:
        installer.install(kinds=("rerank",), smoke=False)
        window = client.search(index=index, body={"size": 30, "query": {"match": {"passage": QUERY}}})[
            "hits"
        ]["hits"]
        got = client.search(
            index=index,
            body=T.search_body(deep, "rerank", QUERY, size=10),
            params={"search_pipeline": T.pipeline_name(deep, "rerank")},
        )["hits"]["hits"]
        assert len(got) == 10
        assert [h["_id"] for h in got] == _sidecar_order(sidecar_url, QUERY, window)[:10]
    finally:
        installer.uninstall(kinds=("rerank",), settings=False)


def test_a_changed_setting_updates_the_connector_in_place(
    client: Any, installed: Installer, index: str
) -> None:
    before = installed._find("connectors", T.connector_name(installed.cfg, "rerank"))[0]["_id"]
    changed = Installer(client, dataclasses.replace(installed.cfg, read_timeout_s=31), log=lambda _: None)
    report = changed.install(index=index, default_pipeline="rerank")
    steps = {(s.what, s.name): s for s in report.steps}
    assert steps[("connector", T.connector_name(installed.cfg, "rerank"))].action == "updated"
    assert steps[("connector", T.connector_name(installed.cfg, "rerank"))].id == before
    assert (
        client.indices.get_settings(index=index)[index]["settings"]["index"]["search"]["default_pipeline"]
        == NAME
    )
    # The default pipeline reranks without naming it.
    hits = client.search(index=index, body=T.search_body(installed.cfg, "rerank", QUERY, size=5))["hits"][
        "hits"
    ]
    assert len(hits) == 5


def test_uninstall_removes_everything(
    client: Any, cfg: T.PluginConfig, index: str, installed: Installer
) -> None:
    report = installed.uninstall()
    assert {s.action for s in report.steps if s.what in ("connector", "model")} == {"deleted"}
    again = installed.uninstall()
    assert {s.action for s in again.steps} <= {"absent"}
    from opensearchpy.exceptions import NotFoundError

    with pytest.raises(NotFoundError):
        client.transport.perform_request("GET", f"/_search/pipeline/{NAME}")
    installed.install(index=index)  # leave it installed for the fixture's own teardown
