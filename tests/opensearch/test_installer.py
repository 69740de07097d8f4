"""The installer against the fake ml-commons cluster (tests/opensearch/fakes.py) whose `_predict` really
calls the in-process sidecar: creation, idempotency, in-place updates, uninstall, and the clear errors."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import main as cli_main
from sidecar.opensearch import templates as T
from sidecar.opensearch.connection import ConnectionOptions
from sidecar.opensearch.installer import Installer, InstallError
from tests.opensearch.conftest import HttpServer
from tests.opensearch.fakes import DEFAULT_TRUSTED, PRIVATE_IP, TRUSTED, FakeCluster

MUTATIONS = ("_create", "_register", "_deploy", "_undeploy")


@pytest.fixture
def fake() -> Iterator[FakeCluster]:
    cluster = FakeCluster()
    cluster.add_index(
        "docs", {"title": {"type": "text"}, "text": {"type": "text"}, "passage": {"type": "text"}}
    )
    yield cluster
    cluster.close()


@pytest.fixture
def cfg(sidecar_http: HttpServer) -> T.PluginConfig:
    return T.PluginConfig(sidecar_url=sidecar_http.url, fields=("passage",), read_timeout_s=30)


def _installer(fake: FakeCluster, cfg: T.PluginConfig) -> Installer:
    return Installer(ConnectionOptions(url=fake.url).connect(), cfg, log=lambda _: None, poll_s=0.01)


def _mutating(fake: FakeCluster, since: int = 0) -> list[tuple[str, str]]:
    return [(m, p) for m, p in fake.requests[since:] if m in ("PUT", "DELETE") or p.endswith(MUTATIONS)]


def test_install_creates_everything_and_proves_the_path(fake: FakeCluster, cfg: T.PluginConfig) -> None:
    report = _installer(fake, cfg).install(index="docs")
    assert report.version == fake.version
    assert len(fake.connectors) == 2 and len(fake.models) == 2 and len(fake.groups) == 1
    assert all(m["model_state"] == "DEPLOYED" for m in fake.models.values())
    # The smoke tests went OpenSearch -> connector -> sidecar and back, for both paths.
    smoke = [s for s in report.steps if s.what == "smoke test"]
    assert [s.name for s in smoke] == ["rerank", "by_field"] and {s.action for s in smoke} == {"ok"}
    # Settings keep the cluster's existing regexes and add ours; loopback needs private IPs.
    assert fake.persistent[TRUSTED] == [*DEFAULT_TRUSTED, T.endpoint_regex(cfg.sidecar_url)]
    assert fake.persistent[PRIVATE_IP] is True
    for kind in T.KINDS:
        assert fake.pipelines[T.pipeline_name(cfg, kind)] == T.pipeline_body(
            cfg, kind, report.model_ids[kind]
        )
    connector = next(c for c in fake.connectors.values() if c["name"] == T.connector_name(cfg, "rerank"))
    assert (
        connector["client_config"]["read_timeout"] == 30
        and connector["client_config"]["connection_timeout"] == 2
    )


def test_a_second_install_changes_nothing(fake: FakeCluster, cfg: T.PluginConfig) -> None:
    first = _installer(fake, cfg).install(index="docs")
    mark = len(fake.requests)
    second = _installer(fake, cfg).install(index="docs")
    assert _mutating(fake, mark) == []
    assert second.model_ids == first.model_ids
    assert {s.action for s in second.steps if s.what != "smoke test"} == {"unchanged"}
    assert len(fake.connectors) == 2 and len(fake.models) == 2 and len(fake.groups) == 1


def test_a_changed_config_updates_in_place(fake: FakeCluster, cfg: T.PluginConfig) -> None:
    first = _installer(fake, cfg).install()
    changed = dataclasses.replace(cfg, read_timeout_s=12, sample_factor=2.0)
    report = _installer(fake, changed).install()
    steps = {(s.what, s.name): s.action for s in report.steps}
    assert steps[("connector", T.connector_name(cfg, "rerank"))] == "updated"
    assert steps[("search pipeline", T.pipeline_name(cfg, "rerank"))] == "updated"
    assert report.model_ids == first.model_ids and len(fake.connectors) == 2
    assert all(c["client_config"]["read_timeout"] == 12 for c in fake.connectors.values())
    # ml-commons refuses to update a connector under a deployed model: the installer redeployed it.
    assert all(m["model_state"] == "DEPLOYED" for m in fake.models.values())
    assert "oversample" in json.dumps(fake.pipelines[T.pipeline_name(cfg, "rerank")])


def test_a_model_on_a_foreign_connector_is_replaced(fake: FakeCluster, cfg: T.PluginConfig) -> None:
    first = _installer(fake, cfg).install(kinds=("rerank",))
    old = first.model_ids["rerank"]
    fake.models[old]["connector_id"] = "someone-else"
    second = _installer(fake, cfg).install(kinds=("rerank",))
    assert second.model_ids["rerank"] != old and old not in fake.models and len(fake.models) == 1


def test_default_pipeline_then_uninstall_removes_what_it_made(fake: FakeCluster, cfg: T.PluginConfig) -> None:
    _installer(fake, cfg).install(index="docs", default_pipeline="by_field")
    assert fake.indices["docs"]["settings"]["index.search.default_pipeline"] == T.pipeline_name(
        cfg, "by_field"
    )
    fake.persistent[TRUSTED].append("^https://other\\.example/.*$")  # someone else's entry survives
    report = _installer(fake, cfg).uninstall()
    assert not fake.connectors and not fake.models and not fake.groups and not fake.pipelines
    assert "index.search.default_pipeline" not in fake.indices["docs"]["settings"]
    assert fake.persistent[TRUSTED] == [*DEFAULT_TRUSTED, "^https://other\\.example/.*$"]
    assert fake.persistent[PRIVATE_IP] is True and any(PRIVATE_IP in n for n in report.notes)
    again = _installer(fake, cfg).uninstall()
    assert {s.action for s in again.steps} == {"absent"}


def test_uninstall_on_a_fresh_cluster_is_harmless(fake: FakeCluster, cfg: T.PluginConfig) -> None:
    report = _installer(fake, cfg).uninstall()
    assert {s.action for s in report.steps} == {"absent"}


def test_a_transient_regex_list_is_extended_where_it_lives(fake: FakeCluster, cfg: T.PluginConfig) -> None:
    fake.transient[TRUSTED] = ["^https://mine/.*$"]
    _installer(fake, cfg).install(kinds=("rerank",))
    assert fake.transient[TRUSTED] == ["^https://mine/.*$", T.endpoint_regex(cfg.sidecar_url)]


@pytest.mark.parametrize(
    ("plugins", "version", "message"),
    [
        ((), "3.1.0", "lacks the ml-commons and neural-search plugin(s)"),
        (("opensearch-ml",), "3.1.0", "lacks the neural-search plugin(s)"),
        (("opensearch-ml", "opensearch-neural-search"), "2.17.1", "too old"),
    ],
)
def test_clusters_that_cannot_host_it_get_a_clear_error(
    cfg: T.PluginConfig, plugins: tuple[str, ...], version: str, message: str
) -> None:
    cluster = FakeCluster(version=version, plugins=plugins)
    try:
        with pytest.raises(InstallError, match=message.replace("(", r"\(").replace(")", r"\)")):
            _installer(cluster, cfg).install()
        assert _mutating(cluster) == []
    finally:
        cluster.close()


def test_a_refused_endpoint_explains_the_setting(fake: FakeCluster, cfg: T.PluginConfig) -> None:
    with pytest.raises(InstallError) as err:
        _installer(fake, cfg).install(kinds=("rerank",), settings=False)
    assert "trusted connector endpoint" in str(err.value) and T.TRUSTED_ENDPOINTS in str(err.value)


def test_a_private_address_explains_the_setting(fake: FakeCluster, cfg: T.PluginConfig) -> None:
    with pytest.raises(InstallError) as err:
        _installer(fake, cfg).install(kinds=("rerank",), private_ip=False)
    assert "private ip" in str(err.value) and T.PRIVATE_IP in str(err.value)


def test_an_unreachable_sidecar_explains_where_the_url_is_resolved(fake: FakeCluster) -> None:
    from sidecar.launch import free_port

    cfg = T.PluginConfig(sidecar_url=f"http://127.0.0.1:{free_port()}", fields=("passage",))
    with pytest.raises(InstallError) as err:
        _installer(fake, cfg).install(kinds=("rerank",))
    assert "cannot reach the sidecar" in str(err.value) and "resolved on the OpenSearch nodes" in str(
        err.value
    )


def test_the_cli_installs_and_uninstalls(fake: FakeCluster, sidecar_http: HttpServer, capsys: Any) -> None:
    args = [
        "opensearch",
        "install",
        "--url",
        fake.url,
        "--sidecar-url",
        sidecar_http.url,
        "--index",
        "docs",
        "--fields",
        "title,text",
        "--read-timeout",
        "30",
        "--default-pipeline",
        "rerank",
    ]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "smoke test" in out and "search_pipeline=rerank-sidecar" in out and "no separator" in out
    assert cli_main(args) == 0
    assert "created" not in capsys.readouterr().out
    assert cli_main(["opensearch", "uninstall", "--url", fake.url, "--sidecar-url", sidecar_http.url]) == 0
    assert not fake.models and not fake.pipelines
    assert cli_main(["opensearch", "install", "--url", fake.url, "--paths", "nope"]) == 2


def test_cli_errors_are_one_line_and_exit_2(capsys: Any) -> None:
    cluster = FakeCluster(plugins=())
    try:
        assert cli_main(["opensearch", "install", "--url", cluster.url]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "lacks" in err
    finally:
        cluster.close()


# ---- rendered files ---------------------------------------------------------------------------
CONFIG_DIR = Path(__file__).resolve().parents[2] / "opensearch_plugin_config"
RENDERINGS = {
    "default": [],
    "deep-window": ["--fields", "passage", "--sample-factor", "4", "--index", "scifact"],
}


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_the_rendered_files_are_current(tmp_path: Path, name: str) -> None:
    """opensearch_plugin_config/<name>/ is `rerank-sidecar opensearch render --out ...` with the flags above;
    regenerate it with that command when the templates change (see opensearch_plugin_config/README.md)."""
    assert cli_main(["opensearch", "render", *RENDERINGS[name], "--out", str(tmp_path)]) == 0
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_text() for p in (CONFIG_DIR / name).iterdir() if p.suffix == ".json"}
    assert fresh == committed, f"stale: re-render opensearch_plugin_config/{name} (see its README)"
