"""Negative mining and the dev split: real SciFact train text, a real Lucene BM25 index."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.eval import datasets
from sidecar.eval.first_stage import Hit
from sidecar.training.mining import MiningConfig, mine, pick_negatives, relevant, split_dev


@pytest.fixture(scope="module")
def train(scifact_train_slice: Path) -> datasets.Dataset:
    return datasets.load(scifact_train_slice, split="train", name="scifact-slice")


@pytest.fixture(scope="module")
def bm25(train: datasets.Dataset, training_cache: Path):  # type: ignore[no-untyped-def]
    from sidecar.eval.bm25 import LuceneBm25

    stage = LuceneBm25(train, cache_root=training_cache)
    yield stage
    stage.close()


def test_pick_negatives_skips_top_ranks_and_excluded_documents() -> None:
    hits = [Hit(f"d{i}", 10.0 - i) for i in range(10)]
    assert pick_negatives(hits, set(), skip_top=2, depth=10, count=3) == ["d2", "d3", "d4"]
    assert pick_negatives(hits, {"d2", "d4"}, skip_top=2, depth=10, count=3) == ["d3", "d5", "d6"]
    # depth bounds the pool: only d8 is left below the skipped ranks once d7 is excluded.
    assert pick_negatives(hits, {"d7"}, skip_top=7, depth=9, count=5) == ["d8"]


def test_mining_never_returns_a_judged_relevant_document(train: datasets.Dataset, bm25) -> None:  # type: ignore[no-untyped-def]
    # skip_top=0 and a deep pool on purpose: BM25 ranks most relevant documents inside it, so only the
    # exclusion keeps them out of the negatives.
    config = MiningConfig(depth=100, skip_top=0, hard_negatives=50, random_negatives=50)
    qids = train.query_ids()
    reachable = sum(
        1
        for q in qids
        if relevant(train.qrels[q]) & {h.doc_id for h in bm25.search(train.queries[q], config.depth)}
    )
    assert reachable >= len(qids) // 2, "BM25 should find the relevant documents, or this test proves nothing"

    mined = mine(train, qids, bm25, config, seed=3)
    assert mined.counts["bm25"] > 0 and mined.counts["random"] > 0
    for e in mined.examples:
        is_relevant = e.doc_id in relevant(train.qrels[e.qid])
        assert (e.label == 1) == is_relevant, e
        assert (e.source == "qrels") == (e.label == 1)
    # Every relevant document is a positive, once, and no query gets a document twice.
    for q in qids:
        docs = [e.doc_id for e in mined.examples if e.qid == q]
        assert len(docs) == len(set(docs))
        assert {e.doc_id for e in mined.examples if e.qid == q and e.label} == relevant(train.qrels[q])


def test_mining_respects_counts_skip_and_seed(train: datasets.Dataset, bm25) -> None:  # type: ignore[no-untyped-def]
    config = MiningConfig(depth=30, skip_top=3, hard_negatives=4, random_negatives=2)
    qids = train.query_ids()
    mined = mine(train, qids, bm25, config, seed=7)
    for q in qids:
        top = [h.doc_id for h in bm25.search(train.queries[q], config.depth)]
        hard = [e.doc_id for e in mined.examples if e.qid == q and e.source == "bm25"]
        assert len(hard) == 4
        assert all(top.index(d) >= 3 for d in hard), "a negative came from the skipped top ranks"
        assert len([e for e in mined.examples if e.qid == q and e.source == "random"]) == 2
    assert mined.negatives_per_positive() == pytest.approx(mined.negatives / mined.positives)
    assert mine(train, qids, bm25, config, seed=7).examples == mined.examples
    assert mine(train, qids, bm25, config, seed=8).examples != mined.examples  # random negatives move


def test_dev_split_is_carved_from_training_queries_deterministically() -> None:
    qids = [str(i) for i in range(50)]
    train_q, dev_q = split_dev(qids, 0.2, seed=1)
    assert len(dev_q) == 10 and not set(train_q) & set(dev_q) and set(train_q) | set(dev_q) == set(qids)
    assert split_dev(qids, 0.2, seed=1) == (train_q, dev_q)
    assert split_dev(qids, 0.2, seed=2)[1] != dev_q
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_dev(qids, 1.0, seed=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"skip_top": 30, "depth": 30}, "leaves nothing"),
        ({"hard_negatives": 0, "random_negatives": 0}, "at least one negative"),
        ({"random_negatives": -1}, "cannot be negative"),
    ],
)
def test_mining_config_rejects_nonsense(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MiningConfig(**kwargs)


def test_embedding_negatives_come_from_the_dense_stage_and_never_repeat(
    train: datasets.Dataset,
    bm25,  # type: ignore[no-untyped-def]
    training_cache: Path,
) -> None:
    from sidecar.eval.dense import DenseExact

    dense = DenseExact(train, cache_root=training_cache)  # the packaged all-MiniLM-L6-v2
    config = MiningConfig(depth=30, skip_top=0, hard_negatives=3, embedding_negatives=3, random_negatives=0)
    qids = train.query_ids()
    mined = mine(train, qids, bm25, config, seed=0, embedding_stage=dense)
    assert mined.counts["embedding"] == 3 * len(qids)
    for q in qids:
        rel = relevant(train.qrels[q])
        hard = [e.doc_id for e in mined.examples if e.qid == q and e.source == "bm25"]
        emb = [e.doc_id for e in mined.examples if e.qid == q and e.source == "embedding"]
        assert not set(emb) & set(hard) and not set(emb) & rel
        dense_top = [h.doc_id for h in dense.search(train.queries[q], 30)]
        assert set(emb) <= set(dense_top)
