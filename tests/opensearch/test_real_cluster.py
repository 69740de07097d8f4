"""The installer and both pipelines against a real OpenSearch node (ml-commons, k-NN, neural-search).

The node: OPENSEARCH_URL, or one the `opensearch_url` fixture starts with `rerank-sidecar opensearch node
start` (RERANK_OPENSEARCH_START=1). .ci/run starts one and sets RERANK_REQUIRE_OPENSEARCH=1, which makes a
skip here a failure. The sidecar runs as a real process on this machine; the node reaches it on 127.0.0.1.
Every expected ranking comes from a direct call to the sidecar on the same hits and text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from sidecar.launch import free_port
from sidecar.opensearch import templates as T
from sidecar.opensearch.connection import ConnectionOptions
from sidecar.opensearch.indexer import index_beir_corpus
from sidecar.opensearch.installer import Installer, InstallError
from tests.conftest import SCIFACT
from tests.opensearch.conftest import post_json

pytestmark = [pytest.mark.opensearch, pytest.mark.slow]

INDEX = "rerank-sidecar-test-scifact"
KNN_INDEX = "rerank-sidecar-test-knn"
SHAPES = "rerank-sidecar-test-shapes"
NAME = "rerank-sidecar-test"
QUERY = "white matter development in newborn brains measured by diffusion MRI"
DIM = 16


def embed(texts: Sequence[str]) -> list[list[float]]:
    """A deterministic bag of hashed words: enough for a lucene HNSW first stage with real neighbours."""
    out = []
    for text in texts:
        v = [0.0] * DIM
        for word in text.lower().split():
            v[int(hashlib.md5(word.encode()).hexdigest(), 16) % DIM] += 1.0
        norm = math.sqrt(sum(x * x for x in v)) or 1.0
        out.append([x / norm for x in v])
    return out


@pytest.fixture(scope="module")
def client(opensearch_url: str) -> Any:
    return ConnectionOptions(url=opensearch_url).connect()


@pytest.fixture(scope="module")
def sidecar_url() -> Iterator[str]:
    from sidecar.launch import SidecarProcess

    with SidecarProcess(["--max-length", "128"]) as sc:
        yield sc.http_url


@pytest.fixture(scope="module")
def cfg(sidecar_url: str) -> T.PluginConfig:
    return T.PluginConfig(sidecar_url=sidecar_url, fields=("passage",), name=NAME, read_timeout_s=30)


@pytest.fixture(scope="module")
def index(client: Any) -> str:
    index_beir_corpus(client, INDEX, SCIFACT, limit=300, recreate=True)
    return INDEX


@pytest.fixture(scope="module")
def installed(client: Any, cfg: T.PluginConfig, index: str) -> Iterator[tuple[Installer, Any]]:
    installer = Installer(client, cfg, log=lambda _: None)
    installer.uninstall()  # a node reused from an earlier run starts clean
    report = installer.install(index=index)
    yield installer, report
    installer.uninstall()
    client.indices.delete(index=index, ignore=[404])


def sidecar_order(sidecar_url: str, query: str, ids: list[str], texts: list[str]) -> list[str]:
    """The sidecar's own ranking of these documents (stable for equal scores)."""
    scores = post_json(sidecar_url, "/v1/opensearch/scores", {"query": query, "documents": texts}).json()[
        "scores"
    ]
    return [ids[i] for i in sorted(range(len(ids)), key=lambda i: -scores[i])]


def bm25(client: Any, index: str, size: int = 10) -> list[dict[str, Any]]:
    hits: list[dict[str, Any]] = client.search(
        index=index, body={"size": size, "query": {"match": {"passage": QUERY}}}
    )["hits"]["hits"]
    return hits


def through(
    client: Any, index: str, cfg: T.PluginConfig, kind: T.Kind, body: dict[str, Any] | None = None
) -> Any:
    body = body or T.search_body(cfg, kind, QUERY, size=10)
    return client.search(index=index, body=body, params={"search_pipeline": T.pipeline_name(cfg, kind)})


# ---- install / re-run / uninstall ---------------------------------------------------------------------
def test_a_fresh_install_creates_settings_connectors_models_and_both_pipelines(
    client: Any, installed: tuple[Installer, Any]
) -> None:
    installer, report = installed
    actions = {(s.what, s.name): s.action for s in report.steps}
    cfg = installer.cfg
    for kind in T.KINDS:
        assert actions[("connector", T.connector_name(cfg, kind))] == "created"
        assert actions[("model", T.model_name(cfg, kind))] == "created"
        assert actions[("search pipeline", T.pipeline_name(cfg, kind))] == "created"
        assert actions[("smoke test", kind)] == "ok"
        model = client.transport.perform_request("GET", f"/_plugins/_ml/models/{report.model_ids[kind]}")
        assert model["model_state"] == "DEPLOYED"
        pipeline = client.transport.perform_request("GET", f"/_search/pipeline/{T.pipeline_name(cfg, kind)}")
        assert report.model_ids[kind] in str(pipeline)
    settings = client.cluster.get_settings(flat_settings=True)["persistent"]
    assert T.endpoint_regex(cfg.sidecar_url) in settings[T.TRUSTED_ENDPOINTS]
    assert settings[T.PRIVATE_IP] == "true"


def test_a_second_install_is_a_no_op(client: Any, installed: tuple[Installer, Any], index: str) -> None:
    installer, _ = installed
    second = installer.install(index=index)
    assert {s.action for s in second.steps} <= {"unchanged", "ok"}, [str(s) for s in second.steps]
    for kind in T.KINDS:
        assert len(installer._find("connectors", T.connector_name(installer.cfg, kind))) == 1
        assert len(installer._find("models", T.model_name(installer.cfg, kind))) == 1


def test_the_smoke_test_works_with_local_models_disabled(client: Any, cfg: T.PluginConfig) -> None:
    """Remote-only clusters disable local models; 2.19 then refuses /_predict/text_similarity/."""
    key = "plugins.ml_commons.local_model.enabled"
    installer = Installer(client, dataclasses.replace(cfg, name=NAME + "-remote-only"), log=lambda _: None)
    client.cluster.put_settings(body={"persistent": {key: False}})
    try:
        report = installer.install(kinds=("rerank", "by_field"), settings=False)
        assert {s.name for s in report.steps if s.what == "smoke test" and s.action == "ok"} == set(T.KINDS)
    finally:
        client.cluster.put_settings(body={"persistent": {key: None}})
        installer.uninstall(settings=False)


def test_uninstall_removes_exactly_what_install_created(client: Any, cfg: T.PluginConfig, index: str) -> None:
    other = dataclasses.replace(cfg, name=NAME + "-own")
    installer = Installer(client, other, log=lambda _: None)
    before_pipelines = set(client.transport.perform_request("GET", "/_search/pipeline"))
    created = installer.install(index=index, smoke=False)
    made = {(s.what, s.id or s.name) for s in created.steps if s.action == "created"}
    removed = installer.uninstall(settings=False)
    gone = {(s.what, s.id or s.name) for s in removed.steps if s.action in ("deleted", "left in place")}
    assert made == gone
    assert set(client.transport.perform_request("GET", "/_search/pipeline")) == before_pipelines
    # The endpoint regex of the fixture's install is shared: settings=False left it alone.
    assert (
        T.endpoint_regex(cfg.sidecar_url)
        in client.cluster.get_settings(flat_settings=True)["persistent"][T.TRUSTED_ENDPOINTS]
    )


# ---- rankings: each pipeline gives the sidecar's own order ------------------------------------------
@pytest.mark.parametrize("kind", T.KINDS)
def test_a_bm25_search_through_the_pipeline_is_the_sidecars_ranking(
    client: Any, installed: tuple[Installer, Any], index: str, sidecar_url: str, kind: T.Kind
) -> None:
    cfg = installed[0].cfg
    plain = bm25(client, index)
    hits = through(client, index, cfg, kind)["hits"]["hits"]
    want = sidecar_order(
        sidecar_url, QUERY, [h["_id"] for h in plain], [h["_source"]["passage"] for h in plain]
    )
    assert [h["_id"] for h in hits] == want
    assert [h["_score"] for h in hits] == sorted((h["_score"] for h in hits), reverse=True)
    if kind == "by_field":
        first = {h["_id"]: h["_score"] for h in plain}
        for h in hits:
            assert abs(h["_source"]["previous_score"] - first[h["_id"]]) < 1e-4
            assert cfg.target_field not in h["_source"]


AWKWARD = 'white "matter" \\ newborn\tbrain — ünïcode / 新生儿 {"json": [1]}'


@pytest.mark.parametrize("kind", T.KINDS)
def test_awkward_query_text_survives_both_paths(
    client: Any, installed: tuple[Installer, Any], index: str, sidecar_url: str, kind: T.Kind
) -> None:
    """Quotes, backslashes, tabs, non-ASCII and JSON-looking text cross ml-commons' escaping intact: the
    ranking equals the sidecar's ranking for the very same query string."""
    cfg = installed[0].cfg
    match = {"match": {"passage": "white matter newborn brain"}}
    plain = client.search(index=index, body={"size": 10, "query": match})["hits"]["hits"]
    body = {**T.search_body(cfg, kind, AWKWARD, size=10), "query": match}
    hits = through(client, index, cfg, kind, body)["hits"]["hits"]
    ids, texts = [h["_id"] for h in plain], [h["_source"]["passage"] for h in plain]
    assert [h["_id"] for h in hits] == sidecar_order(sidecar_url, AWKWARD, ids, texts)


def test_an_untrusted_endpoint_explains_the_setting(client: Any, cfg: T.PluginConfig) -> None:
    other = dataclasses.replace(cfg, name=NAME + "-untrusted", sidecar_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(InstallError) as err:
        Installer(client, other, log=lambda _: None).install(kinds=("rerank",), settings=False)
    assert T.TRUSTED_ENDPOINTS in str(err.value)


def test_an_unreachable_sidecar_fails_the_smoke_test_with_where_the_url_is_resolved(
    client: Any, cfg: T.PluginConfig
) -> None:
    other = dataclasses.replace(
        cfg, name=NAME + "-unreachable", sidecar_url=f"http://127.0.0.1:{free_port()}"
    )
    installer = Installer(client, other, log=lambda _: None)
    try:
        with pytest.raises(InstallError) as err:
            installer.install(kinds=("rerank",))
        assert "cannot reach the sidecar" in str(err.value)
        assert "resolved on the OpenSearch nodes" in str(err.value)
    finally:
        installer.uninstall(kinds=("rerank",))


@pytest.fixture(scope="module")
def knn_index(client: Any) -> Iterator[str]:
    index_beir_corpus(client, KNN_INDEX, SCIFACT, limit=300, recreate=True, knn_dim=DIM, embed=embed)
    yield KNN_INDEX
    client.indices.delete(index=KNN_INDEX, ignore=[404])


@pytest.mark.parametrize("kind", T.KINDS)
def test_a_knn_lucene_search_through_the_pipeline_is_the_sidecars_ranking(
    client: Any, installed: tuple[Installer, Any], knn_index: str, sidecar_url: str, kind: T.Kind
) -> None:
    cfg = installed[0].cfg
    knn = {"knn": {"embedding": {"vector": embed([QUERY])[0], "k": 10}}}
    plain = client.search(index=knn_index, body={"size": 10, "query": knn})["hits"]["hits"]
    assert len(plain) == 10
    body = {**T.search_body(cfg, kind, QUERY, size=10), "query": knn}
    hits = through(client, knn_index, cfg, kind, body)["hits"]["hits"]
    want = sidecar_order(
        sidecar_url, QUERY, [h["_id"] for h in plain], [h["_source"]["passage"] for h in plain]
    )
    assert [h["_id"] for h in hits] == want


# ---- document shapes: dotted paths and lists, as the real processors read them -------------------------
SHAPE_DOCS = [
    {"meta": {"title": t}, "tags": tags, "passage": t}
    for t, tags in [
        ("Diffusion MRI of white matter in preterm infants", ["neonatal imaging", "white matter"]),
        ("Bananas are rich in potassium", ["fruit", "diet"]),
        ("Myelination of the newborn brain", ["brain development", "infants"]),
        ("Stock markets fell on Monday", ["finance", "markets"]),
    ]
]


@pytest.fixture(scope="module")
def shapes(client: Any) -> Iterator[str]:
    client.indices.delete(index=SHAPES, ignore=[404])
    for i, doc in enumerate(SHAPE_DOCS):
        client.index(index=SHAPES, id=str(i), body=doc)
    client.indices.refresh(index=SHAPES)
    yield SHAPES
    client.indices.delete(index=SHAPES, ignore=[404])


def _all_docs(kind_body: dict[str, Any]) -> dict[str, Any]:
    return {**kind_body, "query": {"match_all": {}}}


def test_the_rerank_path_refuses_a_dotted_field_it_would_read_as_empty(
    client: Any, cfg: T.PluginConfig, shapes: str
) -> None:
    dotted = dataclasses.replace(cfg, name=NAME + "-dotted", fields=("meta.title",))
    with pytest.raises(InstallError, match=r"only top-level fields.*meta\.title.*by_field"):
        Installer(client, dotted, log=lambda _: None).install(kinds=("rerank",), smoke=False)


def test_the_by_field_path_reads_a_dotted_field(
    client: Any, cfg: T.PluginConfig, shapes: str, sidecar_url: str
) -> None:
    dotted = dataclasses.replace(cfg, name=NAME + "-dotted", fields=("meta.title",))
    installer = Installer(client, dotted, log=lambda _: None)
    try:
        installer.install(kinds=("by_field",), smoke=False, settings=False)
        hits = through(
            client, shapes, dotted, "by_field", _all_docs(T.search_body(dotted, "by_field", QUERY))
        )
        ids = [str(i) for i in range(len(SHAPE_DOCS))]
        want = sidecar_order(sidecar_url, QUERY, ids, [d["meta"]["title"] for d in SHAPE_DOCS])
        assert [h["_id"] for h in hits["hits"]["hits"]] == want
    finally:
        installer.uninstall(kinds=("by_field",), settings=False)


def test_a_list_field_reaches_the_sidecar_as_java_list_text(
    client: Any, cfg: T.PluginConfig, shapes: str, sidecar_url: str
) -> None:
    """neural-search turns a list of strings into "[a, b]" (List.toString): the ranking is the sidecar's
    ranking of exactly that text, not of the values joined with spaces."""
    listed = dataclasses.replace(cfg, name=NAME + "-list", fields=("tags",))
    installer = Installer(client, listed, log=lambda _: None)
    try:
        installer.install(kinds=("rerank",), smoke=False, settings=False)
        hits = through(client, shapes, listed, "rerank", _all_docs(T.search_body(listed, "rerank", QUERY)))
        ids = [str(i) for i in range(len(SHAPE_DOCS))]
        as_java = ["[" + ", ".join(d["tags"]) + "]" for d in SHAPE_DOCS]
        assert [h["_id"] for h in hits["hits"]["hits"]] == sidecar_order(sidecar_url, QUERY, ids, as_java)
    finally:
        installer.uninstall(kinds=("rerank",), settings=False)


# ---- failure, deeper windows, default pipeline --------------------------------------------------------
@pytest.fixture(scope="module")
def down_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: a stopped sidecar


@pytest.mark.parametrize("kind", T.KINDS)
def test_a_stopped_sidecar_with_ignore_failure_gives_first_stage_order(
    client: Any, cfg: T.PluginConfig, index: str, down_url: str, kind: T.Kind
) -> None:
    down = dataclasses.replace(cfg, name=NAME + "-down", sidecar_url=down_url, ignore_failure=True)
    installer = Installer(client, down, log=lambda _: None)
    try:
        installer.install(kinds=(kind,), smoke=False)
        hits = through(client, index, down, kind)["hits"]["hits"]
        assert [h["_id"] for h in hits] == [h["_id"] for h in bm25(client, index)]
    finally:
        installer.uninstall(kinds=(kind,))


def test_a_stopped_sidecar_without_ignore_failure_fails_with_one_clear_line(
    client: Any, cfg: T.PluginConfig, index: str, down_url: str, opensearch_url: str
) -> None:
    down = dataclasses.replace(cfg, name=NAME + "-down", sidecar_url=down_url)
    installer = Installer(client, down, log=lambda _: None)
    try:
        installer.install(kinds=("rerank",), smoke=False)
        r = _cli(
            "search",
            "--url",
            opensearch_url,
            "--index",
            index,
            "--query",
            QUERY,
            "--name",
            down.name,
            "--pipeline",
            T.pipeline_name(down, "rerank"),
            "--fields",
            "passage",
        )
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert f"the search failed in pipeline {T.pipeline_name(down, 'rerank')!r}" in line
        assert "the sidecar runs" in line
    finally:
        installer.uninstall(kinds=("rerank",))


def test_an_unknown_pipeline_is_one_clear_line(opensearch_url: str, index: str) -> None:
    r = _cli("search", "--url", opensearch_url, "--index", index, "--query", QUERY, "--pipeline", "no-such")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "search pipeline 'no-such' does not exist" in line


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "opensearch", *args], capture_output=True, text=True, timeout=120
    )


def test_oversample_reranks_a_deeper_window(
    client: Any, cfg: T.PluginConfig, index: str, sidecar_url: str
) -> None:
    deep = dataclasses.replace(cfg, name=NAME + "-deep", sample_factor=3.0)
    installer = Installer(client, deep, log=lambda _: None)
    try:
        installer.install(kinds=("rerank",), smoke=False, settings=False)
        window = bm25(client, index, size=30)
        got = through(client, index, deep, "rerank")["hits"]["hits"]
        want = sidecar_order(
            sidecar_url, QUERY, [h["_id"] for h in window], [h["_source"]["passage"] for h in window]
        )
        assert [h["_id"] for h in got] == want[:10]
    finally:
        installer.uninstall(kinds=("rerank",), settings=False)


@pytest.mark.parametrize("kind", T.KINDS)
def test_with_a_default_pipeline_counts_aggregations_and_empty_pages_still_work(
    client: Any, installed: tuple[Installer, Any], index: str, sidecar_url: str, kind: T.Kind
) -> None:
    installer, _ = installed
    cfg = installer.cfg
    report = installer.install(index=index, default_pipeline=kind)
    try:
        name = client.indices.get_settings(index=index)[index]["settings"]["index"]["search"][
            "default_pipeline"
        ]
        assert name == T.default_pipeline_name(cfg, kind)
        match = {"match": {"passage": QUERY}}
        total = client.count(index=index, body={"query": match})["count"]
        assert total > 10
        aggs = client.search(
            index=index, body={"size": 0, "query": match, "aggs": {"n": {"value_count": {"field": "doc_id"}}}}
        )
        assert aggs["aggregations"]["n"]["value"] == total
        no_ext = client.search(index=index, body={"size": 5, "query": match})["hits"]["hits"]
        assert [h["_id"] for h in no_ext] == [h["_id"] for h in bm25(client, index, size=5)]
        past_end = {**T.search_body(cfg, kind, QUERY, size=10), "from": total + 5}
        assert client.search(index=index, body=past_end)["hits"]["hits"] == []
        # A reranking search through the default pipeline is still reranked.
        plain = bm25(client, index)
        hits = client.search(index=index, body=T.search_body(cfg, kind, QUERY, size=10))["hits"]["hits"]
        want = sidecar_order(
            sidecar_url, QUERY, [h["_id"] for h in plain], [h["_source"]["passage"] for h in plain]
        )
        assert [h["_id"] for h in hits] == want
    finally:
        client.indices.put_settings(index=index, body={"index.search.default_pipeline": None})
        assert any(s.what == "default pipeline" for s in report.steps)


# ---- the evaluator's OpenSearch stages ------------------------------------------------------------------
@pytest.mark.parametrize("kind", T.KINDS)
def test_the_evaluator_replays_through_each_pipeline(
    client: Any,
    installed: tuple[Installer, Any],
    index: str,
    sidecar_url: str,
    opensearch_url: str,
    kind: T.Kind,
) -> None:
    """`replay --first-stage opensearch --api opensearch`: the reranked list of each query is the sidecar's
    ranking of that query's first-stage hits (so the pipeline saw the real passages, not empty _source)."""
    from sidecar.eval.datasets import load
    from sidecar.eval.opensearch_stage import OpenSearchFirstStage, OpenSearchPipelineReranker
    from sidecar.eval.replay import ReplayConfig, replay

    dataset = load(SCIFACT)
    stage = OpenSearchFirstStage(opensearch_url, index, fields=("passage",))
    reranker = OpenSearchPipelineReranker(stage, T.pipeline_name(installed[0].cfg, kind))
    qids = [q for q in dataset.query_ids() if stage.search(dataset.queries[q], 10)][:3]
    try:
        result = replay(dataset, qids, stage, reranker, ReplayConfig(hits=10, depth=10))
    finally:
        stage.close()
    assert not result.rerank_errors
    for qid in qids:
        rec = result.records[qid]
        assert rec.rerank is not None
        ids = [h.doc_id for h in rec.first_stage[:10]]
        texts = [client.get(index=index, id=i)["_source"]["passage"] for i in ids]
        got = [d for d, _ in rec.rerank.ranking]
        assert got == sidecar_order(sidecar_url, dataset.queries[qid], ids, texts)
