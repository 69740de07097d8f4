"""The cascade (settings.cascade, docs/runtimes.md "Cascade"), served end to end on a real gRPC server.

A tiny random cross-encoder is served in torch float32 with an OpenVINO int8 first pass. The expected
answer is built from the two engines' own scores of every document: the first pass's scores, with the
top `DEPTH` of them replaced by the served precision's. The served precision is checked against
sentence-transformers' `CrossEncoder.predict` (1e-4) and the first pass against an OpenVINO int8 scorer
loaded on its own from the same export cache (1e-5), so neither engine is taken on trust. The documents
are picked so that the first pass's top `DEPTH` stand clear of the rest (a gap of at least 1e-4), and the
test requires int8 to move the top scores by more than 1e-4, so the two passes can be told apart.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from sidecar.client import RerankerClient
from sidecar.scoring.base import Pair, Scorer
from sidecar.types import HitStatus
from tests.conftest import make_scorer, test_settings
from tests.fakes import BatchGate, RecordingScorer
from tests.opensearch.conftest import http_request
from tests.texts import documents

QUERY = "how do vaccines protect against disease"
DEPTH = 3
FIRST = "openvino/int8"


@pytest.fixture(scope="module")
def cascade_scorer(bert_ce_dir: Path, export_dir: Path) -> Scorer:
    return make_scorer(
        bert_ce_dir,
        runtime="torch",
        dtype="float32",
        cascade=FIRST,
        cascade_depth=DEPTH,
        export_cache_dir=str(export_dir),
    )


class Case:
    """Eight documents whose first-pass top DEPTH stand clear of the rest, in an input order that is not
    their ranking; per document its first-pass (`fast`) and served-precision (`precise`) score."""

    def __init__(self, scorer: Scorer, bert_ce_dir: Path, export_dir: Path) -> None:
        from sentence_transformers import CrossEncoder

        pool = documents(24)
        pairs = [Pair(QUERY, d) for d in pool]
        fast = scorer.score(pairs, first_pass=True)
        order = [int(i) for i in np.argsort(-fast, kind="stable")]
        top = order[:DEPTH]
        rest = [i for i in order[DEPTH:] if fast[top[-1]] - fast[i] > 1e-4][:5]
        assert len(rest) == 5, "the pool has too few documents below a clear gap"
        chosen = (top + rest)[::-1]  # input order: the reverse of the first pass's ranking
        self.texts = [pool[i] for i in chosen]
        self.fast = np.array([fast[i] for i in chosen], dtype=np.float32)
        self.precise = scorer.score([Pair(QUERY, t) for t in self.texts])
        self.top = set(range(len(chosen) - DEPTH, len(chosen)))  # where the top DEPTH sit in input order
        # Neither engine is taken on trust.
        reference = CrossEncoder(str(bert_ce_dir), device="cpu").predict([(QUERY, t) for t in self.texts])
        np.testing.assert_allclose(self.precise, reference, atol=1e-4, rtol=0)
        alone = make_scorer(
            bert_ce_dir,
            runtime="openvino",
            dtype="float32",
            quantize="int8",
            export_cache_dir=str(export_dir),
        )
        np.testing.assert_allclose(
            self.fast, alone.score([Pair(QUERY, t) for t in self.texts]), atol=1e-5, rtol=0
        )
        moved = max(abs(float(self.precise[i] - self.fast[i])) for i in self.top)
        assert moved > 1e-4, "int8 scores equal float32 here: the passes could not be told apart"

    def which(self, pair: Pair) -> int:
        """The document a pair that reached the model came from (it gets them clipped to its limit)."""
        return next(i for i, t in enumerate(self.texts) if t.startswith(pair.document))

    def expected(self, indices: list[int] | None = None) -> dict[int, float]:
        """Per input position (of the documents sent, `indices` of this case's), the cascade's score."""
        indices = list(range(len(self.texts))) if indices is None else indices
        fast = [float(self.fast[i]) for i in indices]
        top = set(sorted(range(len(indices)), key=lambda j: -fast[j])[:DEPTH])
        return {j: float(self.precise[i]) if j in top else fast[j] for j, i in enumerate(indices)}


@pytest.fixture(scope="module")
def case(cascade_scorer: Scorer, bert_ce_dir: Path, export_dir: Path) -> Case:
    return Case(cascade_scorer, bert_ce_dir, export_dir)


def _settings(**extra: object):  # type: ignore[no-untyped-def]
    return test_settings(warmup=False, fusion="none", **extra)


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def _scores(result) -> dict[int, float]:  # type: ignore[no-untyped-def]
    return {h.index: h.score for h in result.hits}


def test_first_pass_then_the_top_rescored_and_reported(server_factory, cascade_scorer, case) -> None:  # type: ignore[no-untyped-def]
    rec = RecordingScorer(cascade_scorer)
    srv = server_factory(_settings(), scorer=rec)
    with RerankerClient(srv.target) as client:
        info = client.info()
        result = client.rerank(QUERY, case.texts)
        short = client.rerank(QUERY, case.texts[:DEPTH])  # no more than DEPTH documents: one pass
        top2 = client.rerank(QUERY, case.texts, top_n=2)
    assert (info.runtime, info.dtype, info.cascade, info.cascade_depth) == ("torch", "float32", FIRST, DEPTH)

    expected = case.expected()
    got = _scores(result)
    assert got.keys() == expected.keys()
    for i, score in expected.items():
        assert got[i] == pytest.approx(score, abs=1e-5), i
    assert [h.index for h in result.hits] == sorted(expected, key=lambda i: -expected[i])
    assert all(h.status is HitStatus.RERANKED for h in result.hits)
    # First the whole request through the first pass, then only the top DEPTH at the served precision.
    assert rec.first_pass_batches[0] is True
    second = [
        case.which(p)
        for b, first in zip(rec.batches, rec.first_pass_batches, strict=True)
        for p in b
        if not first
    ]
    assert set(second[:DEPTH]) == case.top and len(second) >= DEPTH

    short_expected = {j: float(case.precise[j]) for j in range(DEPTH)}
    for i, score in _scores(short).items():
        assert score == pytest.approx(short_expected[i], abs=1e-5)
    assert [h.index for h in top2.hits] == [h.index for h in result.hits[:2]]

    http_info = http_request(f"http://127.0.0.1:{srv.server.http_port}", "GET", "/v1/info").json()
    assert (http_info["cascade"], http_info["cascade_depth"]) == (FIRST, DEPTH)
    metrics = _metrics(srv.server.http_port)
    assert f'reranker_cascade_info{{depth="{DEPTH}",first_pass="{FIRST}"}} 1.0' in metrics
    assert 'reranker_cascade_requests_total{outcome="rescored"} 2.0' in metrics
    assert 'reranker_cascade_requests_total{outcome="direct"} 1.0' in metrics


def test_each_pass_keeps_its_own_cache_entries(server_factory, cascade_scorer, case) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory(_settings(score_cache_bytes=1 << 20), scorer=cascade_scorer)
    n = len(case.texts)
    with RerankerClient(srv.target) as client:
        first = client.rerank(QUERY, case.texts)
        again = client.rerank(QUERY, case.texts)
        # Documents the first request scored with the first pass only: cached at that precision, and
        # never served as the served precision's scores now that they make this request's top.
        below = [i for i in range(n) if i not in case.top]
        lower = client.rerank(QUERY, [case.texts[i] for i in below])
    assert first.cached_pairs == 0
    assert again.cached_pairs == n + DEPTH and _scores(again) == _scores(first)
    assert lower.cached_pairs == len(below)  # every first-pass score, none of the re-scored ones
    expected = case.expected(below)
    for j, score in _scores(lower).items():
        assert score == pytest.approx(expected[j], abs=1e-5), j


def test_deadline_during_the_rescore(server_factory, cascade_scorer, case) -> None:  # type: ignore[no-untyped-def]
    """The first pass gets through, the re-score is held past the deadline: with partial results the
    answer is the first pass's whole ranking (never a mix); without, DEADLINE_EXCEEDED."""
    gate = BatchGate()
    srv = server_factory(
        _settings(max_wait_ms=0, partial_results_margin_ms=50), scorer=RecordingScorer(cascade_scorer, gate)
    )
    gate.allow(1)  # the first pass's one batch
    try:
        with RerankerClient(srv.target) as client:
            result = client.rerank(QUERY, case.texts, timeout=1.5, partial_results=True)
            gate.allow(1)
            with pytest.raises(grpc.RpcError) as err:
                client.rerank(QUERY, case.texts, timeout=1.0)
    finally:
        gate.open()
    assert all(h.status is HitStatus.RERANKED for h in result.hits)
    for h in result.hits:
        assert h.score == pytest.approx(float(case.fast[h.index]), abs=1e-5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    metrics = _metrics(srv.server.http_port)
    assert 'reranker_cascade_requests_total{outcome="first_pass_only"} 1.0' in metrics
    assert "reranker_partial_answers_total 0.0" in metrics  # a whole first pass, not a partial answer


def test_refused_with_one_line(bi_encoder_dir: Path, export_dir: Path) -> None:
    from pydantic import ValidationError

    from sidecar.scoring.runtimes import RuntimeUnavailable
    from sidecar.settings import Settings

    with pytest.raises(ValidationError, match="use auto, none or a first pass among openvino/float32"):
        Settings(cascade="openvino/int4")
    with pytest.raises(RuntimeUnavailable, match="a bi-encoder scores each document once"):
        make_scorer(bi_encoder_dir, dtype="float32", cascade=FIRST, export_cache_dir=str(export_dir))


def test_the_guard_judges_cascades_from_the_scores_it_measured() -> None:
    """One query, twelve documents, one relevant (d0). The reference ranks d0 first; the int8 first pass
    (failed alone) ranks it fifth. Re-scoring its top 3 leaves d0 second (nDCG@10 1/log2(3)); its top 6
    include d0, which the served precision puts back first (nDCG@10 1). Speeds: first pass 40 pairs/s,
    served 10: a cascade costs 1/40 + depth/12 x 1/10 s a pair."""
    from sidecar.guard import (
        REFERENCE,
        Candidates,
        GuardConfig,
        Scored,
        cascade_rows,
        compare,
        ndcg10_per_query,
    )

    docs = [f"d{i}" for i in range(12)]
    cands = Candidates(
        "t", "train", 12, ["q"], {"q": docs}, {"q": [("q", d) for d in docs]}, {"q": {"d0": 1}}, {}
    )
    precise = np.array([1.0] + [0.5 - 0.01 * i for i in range(11)], dtype=np.float32)
    fast = np.array([0.6, 0.9, 0.85, 0.8, 0.7] + [0.5 - 0.01 * i for i in range(7)], dtype=np.float32)
    ref = Scored(REFERENCE, {"q": precise}, 1.2, 12, "float32")
    ref_ndcg = ndcg10_per_query(cands, ref.scores)
    first = Scored(GuardConfig("openvino", "float32", "int8"), {"q": fast}, 0.3, 12, "int8")
    measured = [(ref, compare(cands, ref, ref, ref_ndcg)), (first, compare(cands, ref, first, ref_ndcg))]
    assert measured[1][1]["passed"] is False and measured[1][1]["ndcg@10"] == pytest.approx(
        1 / np.log2(6), abs=1e-4
    )

    rows = cascade_rows(cands, ref, ref_ndcg, measured, depths=(3, 6, 11))
    by_depth = {r["cascade"]["depth"]: r for r in rows}
    assert sorted(by_depth) == [3, 6]  # 11 would be slower than the served precision alone
    assert by_depth[3]["ndcg@10"] == pytest.approx(1 / np.log2(3), abs=1e-4) and not by_depth[3]["passed"]
    assert by_depth[6]["ndcg@10"] == pytest.approx(1.0) and by_depth[6]["passed"]
    assert by_depth[3]["pairs_per_s"] == pytest.approx(1 / (1 / 40 + 3 / 12 / 10), rel=1e-3)
    assert by_depth[6]["pairs_per_s"] == pytest.approx(1 / (1 / 40 + 6 / 12 / 10), rel=1e-3)
    assert {(r["runtime"], r["precision"], r["cascade"]["precision"]) for r in rows} == {
        ("torch", "float32", "int8")
    }
    assert all(r["pairs_per_s_estimated"] for r in rows)


def test_batches_hold_one_pass_and_share_within_it(cascade_scorer: Scorer) -> None:
    """Two first-pass requests and one at the served precision, queued together: no batch mixes passes,
    the two first-pass requests share batches, and each request's scores are its engine's own."""
    import asyncio

    from sidecar.batcher import Batcher
    from sidecar.metrics import Metrics
    from tests.texts import queries

    rec = RecordingScorer(cascade_scorer)
    q1, q2, q3 = queries(3)
    first_pass = {q1: True, q2: False, q3: True}
    docs = documents(24)

    async def main() -> list:
        b = Batcher(
            rec, Metrics(), max_batch_tokens=2048, max_batch_pairs=64, max_wait_s=0.02, max_queue_pairs=1000
        )
        b.start()
        loop = asyncio.get_running_loop()
        jobs = []
        for q in (q1, q2, q3):
            pairs = [Pair(q, d) for d in docs]
            measures = cascade_scorer.measure(pairs)
            pairs = [m.clipped or p for p, m in zip(pairs, measures, strict=True)]
            jobs.append(
                b.submit(pairs, [m.tokens for m in measures], loop.time() + 60, None,
                         [m.encoding for m in measures], first_pass[q])
            )  # fmt: skip
        results = await asyncio.gather(*jobs)
        await b.close()
        return [scores for scores, _ in results]

    got = asyncio.run(main())
    for batch, flag in zip(rec.batches, rec.first_pass_batches, strict=True):
        assert {first_pass[p.query] for p in batch} == {flag}
    assert any({p.query for p in batch} == {q1, q3} for batch in rec.batches)
    for q, scores in zip((q1, q2, q3), got, strict=True):
        alone = cascade_scorer.score([Pair(q, d) for d in docs], first_pass=first_pass[q])
        np.testing.assert_allclose(scores, alone, atol=1e-5)
