"""OpenSearch as the first stage: BM25 `match` through opensearch-py against a real osmem-server process, with
the corpus loaded by the OpenSearch loader. The search-pipeline rerank runs against a real node in
tests/opensearch/test_real_cluster.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.eval import report
from sidecar.eval.__main__ import main
from sidecar.eval.datasets import Dataset
from sidecar.eval.opensearch_stage import (
    OpenSearchFirstStage,
    connect,
    lexical_query,
)
from sidecar.eval.replay import ReplayConfig, replay

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def osmem_url() -> Iterator[str]:
    """An osmem-server subprocess listening on a free port (its default address is 127.0.0.1:0)."""
    osmem = pytest.importorskip("osmem_server")
    server = osmem.OsmemServer.start(japanese=False)
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def tiny_index(osmem_url: str, tiny: Dataset) -> str:
    from sidecar.opensearch.indexer import index_beir_corpus

    client = connect(osmem_url)
    try:
        assert index_beir_corpus(client, "tiny", tiny.path, recreate=True) == len(tiny.corpus)
    finally:
        client.close()
    return "tiny"


def test_lexical_query_shapes() -> None:
    assert lexical_query("q", ["passage"]) == {"match": {"passage": "q"}}
    assert lexical_query("q", ["title", "text"]) == {
        "multi_match": {"query": "q", "fields": ["title", "text"]}
    }


def test_bm25_first_stage_through_opensearch(osmem_url: str, tiny_index: str, tiny: Dataset) -> None:
    stage = OpenSearchFirstStage(osmem_url, tiny_index)
    try:
        assert stage.search(tiny.queries["q1"], 3)[0].doc_id == "d2"
        assert stage.search(tiny.queries["q3"], 3)[0].doc_id == "d4"
        single = OpenSearchFirstStage(osmem_url, tiny_index, fields=["passage"])
        assert single.search(tiny.queries["q2"], 3)[0].doc_id == "d3"
        single.close()
        result = replay(tiny, tiny.query_ids(), stage, None, ReplayConfig(hits=10, depth=0, concurrency=2))
        summary = report.build_result(tiny, result, first_stage=stage.describe(), rerank=None)
    finally:
        stage.close()
    assert summary["metrics"]["first_stage"]["recall@10"] == 1.0
    assert summary["metrics"]["first_stage"]["mrr@10"] == 1.0
    assert summary["first_stage"]["kind"] == "opensearch"


def test_missing_index_is_a_clear_error(osmem_url: str) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        OpenSearchFirstStage(osmem_url, "no-such-index")


def test_cli_loads_the_corpus_and_replays(osmem_url: str, tiny: Dataset, tmp_path: Path) -> None:
    out = tmp_path / "os-run"
    rc = main(
        [
            "replay",
            "--dataset-dir",
            str(tiny.path),
            "--first-stage",
            "opensearch",
            "--opensearch-url",
            osmem_url,
            "--opensearch-index",
            "tiny-cli",
            "--opensearch-load",
            "--api",
            "none",
            "--hits",
            "10",
            "--warmup",
            "0",
            "--no-plots",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads((out / report.RESULT_JSON).read_text())
    assert result["first_stage"]["index"] == "tiny-cli"
    assert result["metrics"]["first_stage"]["recall@10"] == 1.0


def test_sidecar_time_on_the_pipeline_path_comes_from_its_metrics(bert_scorer, server_factory) -> None:  # type: ignore[no-untyped-def]
    """Through OpenSearch the sidecar's answers never reach the evaluator, so its own time is read from its
    /metrics: the deltas count exactly the HTTP rerank calls made in between (a real server, real calls)."""
    from sidecar.eval.opensearch_stage import sidecar_http_time
    from tests.opensearch.conftest import post_json

    srv = server_factory(scorer=bert_scorer)
    url = f"http://127.0.0.1:{srv.server.http_port}"
    count0, seconds0 = sidecar_http_time(url)
    for _ in range(3):
        assert post_json(url, "/v1/rerank", {"query": "q", "documents": ["a", "b c"]}).status == 200
    count1, seconds1 = sidecar_http_time(url)
    assert count1 - count0 == 3 and seconds1 > seconds0
