"""BM25 through pyserini: the published SciFact figures reproduced exactly, and the index cache."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.eval import cache, datasets
from sidecar.eval import metrics as m
from sidecar.eval.bm25 import LuceneBm25, build_index, corpus_key
from sidecar.eval.replay import ReplayConfig, replay

pytestmark = pytest.mark.slow


def test_scifact_bm25_flat_reproduces_pyserini(scifact: datasets.Dataset, scifact_bm25: LuceneBm25) -> None:
    """pyserini's BEIR "flat" BM25 on SciFact test (2CR): nDCG@10 0.6789, R@100 0.9253, R@1000 0.9767."""
    qids = scifact.query_ids()
    # Two replay threads: the searcher is shared across JVM-attached threads, as in a concurrent replay.
    result = replay(scifact, qids, scifact_bm25, None, ReplayConfig(hits=1000, depth=0, concurrency=2))
    agg = m.aggregate(
        m.evaluate(scifact.qrels, result.first_stage_run(), qids, ["ndcg@10", "recall@100", "recall@1000"])
    )
    assert len(qids) == 300
    assert round(agg["ndcg@10"], 4) == 0.6789
    assert round(agg["recall@100"], 4) == 0.9253
    assert round(agg["recall@1000"], 4) == 0.9767


def test_scifact_index_statistics(scifact_bm25: LuceneBm25) -> None:
    stats = scifact_bm25.stats()
    assert stats["documents"] == 5183
    assert stats["total_terms"] == 838128  # as the dataset README records for the flat index


def test_index_is_cached_by_content(
    tiny: datasets.Dataset, beir_factory: Callable[..., Path], tmp_path: Path
) -> None:
    first = build_index(tiny, tmp_path)
    assert cache.is_complete(first)
    marker = first / "reused"
    marker.touch()
    assert build_index(tiny, tmp_path) == first and marker.exists()  # reused, not rebuilt
    # The same files with CRLF line ends hold the same content: same key.
    crlf = datasets.load(beir_factory(newline="\r\n"), name="tiny")
    assert corpus_key(crlf) == corpus_key(tiny)
    # One changed document: a new key, a new index.
    from tests.eval.beir_helpers import TINY_CORPUS

    changed = [dict(d) for d in TINY_CORPUS]
    changed[0]["text"] = "Cats purr."
    other = datasets.load(beir_factory(corpus=changed), name="tiny")
    assert corpus_key(other) != corpus_key(tiny)
    assert build_index(other, tmp_path) != first


def test_tiny_search(tiny: datasets.Dataset, tmp_path: Path) -> None:
    stage = LuceneBm25(tiny, cache_root=tmp_path)
    try:
        hits = stage.search("why do dogs bark", 3)
        assert hits[0].doc_id == "d2"
        assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
        assert stage.search("   ", 10) == []
        assert stage.describe()["k1"] == 0.9
    finally:
        stage.close()
