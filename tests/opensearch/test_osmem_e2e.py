"""End to end through opensearch-py against a real server process (osmem-server: OpenSearch-compatible REST
with BM25, but no search pipelines and no ml-commons) and a real sidecar process (`python -m sidecar serve`,
the packaged all-MiniLM-L6-v2).

SciFact is loaded with the same command users run (`rerank-sidecar opensearch index`), BM25 top-k comes
from the index and the sidecar scores the hits' passages. What the real pipelines do with those scores is
tested against a real OpenSearch node (test_real_cluster.py); osmem stays for what that node cannot show:
a cluster without ml-commons / neural-search, and a quick full-SciFact BM25 index.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sidecar.opensearch import mlcommons
from tests.conftest import SCIFACT
from tests.opensearch.conftest import post_json

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").exists(), reason="SciFact is not beside the repo"),
]

INDEX = "scifact"
TOP_K = 20
N_QUERIES = 25
# This machine is slow and shared: give the sidecar (and the emulated connector) a generous read timeout.
READ_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def osmem() -> Iterator[Any]:
    osmem_server = pytest.importorskip("osmem_server")
    with osmem_server.OsmemServer.start(japanese=False) as server:
        yield server


@pytest.fixture(scope="module")
def indexed(osmem: Any) -> str:
    cmd = [
        sys.executable,
        "-m",
        "sidecar",
        "opensearch",
        "index",
        "--url",
        osmem.url,
        "--index",
        INDEX,
        "--corpus",
        str(SCIFACT),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "indexed 5183 documents" in done.stdout
    return osmem.url


@pytest.fixture(scope="module")
def client(indexed: str) -> Any:
    from opensearchpy import OpenSearch

    return OpenSearch(hosts=[indexed], timeout=60)


@pytest.fixture(scope="module")
def sidecar() -> Iterator[Any]:
    from sidecar.launch import SidecarProcess

    with SidecarProcess(["--max-length", "128"]) as sc:
        yield sc


def _queries() -> list[tuple[str, str, dict[str, int]]]:
    texts = {}
    with (SCIFACT / "queries.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            texts[row["_id"]] = row["text"]
    qrels: dict[str, dict[str, int]] = {}
    with (SCIFACT / "qrels" / "test.tsv").open(newline="") as f:
        for line in f:
            qid, doc, rel = line.rstrip("\r\n").split("\t")
            if qid != "query-id":
                qrels.setdefault(qid, {})[doc] = int(rel)
    return [(qid, texts[qid], rel) for qid, rel in list(qrels.items())[:N_QUERIES]]


def _ndcg10(ranked: list[str], rel: dict[str, int]) -> float:
    dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(sorted(rel.values(), reverse=True)[:10]))
    return dcg / idcg


def _bm25(client: Any, query: str, size: int = TOP_K) -> list[dict[str, Any]]:
    body = {"size": size, "query": {"match": {"passage": query}}}
    return list(client.search(index=INDEX, body=body)["hits"]["hits"])


def _rerank_like_the_processor(
    sidecar: Any, query: str, hits: list[dict[str, Any]], fields: list[str]
) -> list:
    """The sidecar's scores for these hits' text, highest first: what the pipelines return (shown against a
    real OpenSearch node in test_real_cluster.py)."""
    docs = [" ".join(str(h["_source"].get(f, "")) for f in fields) for h in hits]
    reply = post_json(sidecar.http_url, mlcommons.PATH_SCORES, {"query": query, "documents": docs})
    assert reply.status == 200, reply.body[:300]
    scores = reply.json()["scores"]
    rescored = [{**h, "_score": s, "previous": h["_score"]} for h, s in zip(hits, scores, strict=True)]
    return sorted(rescored, key=lambda h: -h["_score"])


def test_the_index_has_bm25_fields_and_all_documents(client: Any) -> None:
    mapping = client.indices.get_mapping(index=INDEX)[INDEX]["mappings"]["properties"]
    assert mapping["title"]["type"] == mapping["text"]["type"] == mapping["passage"]["type"] == "text"
    assert client.count(index=INDEX)["count"] == 5183
    hit = client.get(index=INDEX, id="4983")["_source"]
    assert hit["passage"] == f"{hit['title']} {hit['text']}" and hit["doc_id"] == "4983"


def test_reranking_keeps_or_improves_ndcg(client: Any, sidecar: Any) -> None:
    """The sidecar's order of each query's BM25 hits is sentence-transformers' cosine order (the reference),
    nDCG@10 is trec_eval's (pytrec_eval) for those orders, and on these 25 queries reranking the top 20
    with the packaged model does not lose to BM25 (it gains on SciFact: a check that fails if the scores
    come back misaligned with their hits)."""
    from sentence_transformers import SentenceTransformer

    from sidecar.eval import metrics as m
    from sidecar.model_factory import packaged_embedding_model_dir

    st = SentenceTransformer(str(packaged_embedding_model_dir()), device="cpu")
    st.max_seq_length = 128
    qrels: dict[str, dict[str, int]] = {}
    before: m.Run = {}
    after: m.Run = {}
    for qid, query, rel in _queries():
        hits = _bm25(client, query)
        reranked = _rerank_like_the_processor(sidecar, query, hits, ["passage"])
        assert len(reranked) == len(hits) and {h["_id"] for h in reranked} == {h["_id"] for h in hits}
        emb = st.encode([query] + [h["_source"]["passage"] for h in reranked], normalize_embeddings=True)
        reference = emb[1:] @ emb[0]
        assert np.all(np.diff(reference) <= 1e-3), qid  # the sidecar's order is the reference's order
        qrels[qid] = rel
        before[qid] = [(h["_id"], float(len(hits) - i)) for i, h in enumerate(hits)]
        after[qid] = [(h["_id"], float(len(hits) - i)) for i, h in enumerate(reranked)]
        assert _ndcg10([h["_id"] for h in reranked], rel) == pytest.approx(
            m.evaluate(qrels, after, [qid], ["ndcg@10"])["ndcg@10"][qid], abs=1e-9
        )
    bm25 = m.mean(m.evaluate(qrels, before, list(qrels), ["ndcg@10"])["ndcg@10"])
    rr = m.mean(m.evaluate(qrels, after, list(qrels), ["ndcg@10"])["ndcg@10"])
    print(f"nDCG@10 over {len(qrels)} SciFact test queries: BM25 top-{TOP_K} {bm25:.4f} -> reranked {rr:.4f}")
    assert rr > bm25


def test_the_cli_searches_osmem(indexed: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "sidecar",
        "opensearch",
        "search",
        "--url",
        indexed,
        "--index",
        INDEX,
        "--fields",
        "passage",
        "--query",
        "microstructural development of white matter",
        "--size",
        "3",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 3 and "4983" in done.stdout


def test_installer_explains_a_cluster_without_the_plugins(indexed: str, tmp_path: Path) -> None:
    """osmem answers like OpenSearch but has neither ml-commons nor neural-search: install must say so."""
    cmd = [sys.executable, "-m", "sidecar", "opensearch", "install", "--url", indexed, "--index", INDEX]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "lacks the ml-commons and neural-search plugin(s)" in done.stderr, done.stderr


def test_the_indexer_adds_a_knn_field_and_is_idempotent(osmem: Any) -> None:
    from opensearchpy import OpenSearch

    from sidecar.opensearch.indexer import BeirDoc, index_beir_corpus

    client = OpenSearch(hosts=[osmem.url], timeout=60)
    docs = [BeirDoc(str(i), f"title {i}", f"text number {i}") for i in range(25)]

    def embed(texts: Any) -> list[list[float]]:
        return [[float(len(t)), 1.0, 0.0, float(i)] for i, t in enumerate(texts)]

    for _ in range(2):  # a second run overwrites by BEIR id
        n = index_beir_corpus(client, "knn-test", docs, knn_dim=4, embed=embed, batch_size=10)
        assert n == 25
    assert client.count(index="knn-test")["count"] == 25
    props = client.indices.get_mapping(index="knn-test")["knn-test"]["mappings"]["properties"]
    assert props["embedding"]["type"] == "knn_vector" and props["embedding"]["dimension"] == 4
    assert len(client.get(index="knn-test", id="3")["_source"]["embedding"]) == 4
    with pytest.raises(ValueError):
        index_beir_corpus(client, "knn-test", docs, knn_dim=4)
    with pytest.raises(FileNotFoundError):
        index_beir_corpus(client, "knn-test", "/nonexistent/beir")
