"""The score cache (sidecar/score_cache.py) through real servers and clients: a repeated pair costs no
forward pass and gets the bit-identical score; only missing pairs reach the model; anything the score
depends on (instruction, max length, model) misses; the byte bound evicts; bypass reads nothing; the
metrics move; HTTP and gRPC share one cache."""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np

from sidecar.client import RerankerClient
from sidecar.metrics import Metrics
from sidecar.opensearch import mlcommons
from sidecar.score_cache import ENTRY_BYTES, CachedScore, ScoreCache
from sidecar.scoring.base import Pair, Scorer
from tests.conftest import make_scorer, test_settings
from tests.fakes import RecordingScorer
from tests.opensearch.conftest import http_request

QUERY = "how do plants make energy"
DOCS = [
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The stock market closed higher on Friday.",
    "Chlorophyll absorbs mostly blue and red light.",
    "A recipe for banana bread with walnuts.",
]


def counter(srv, name: str) -> float:
    return srv.server.metrics.registry.get_sample_value(name) or 0.0


def served(server_factory, scorer: Scorer, **overrides: object):  # type: ignore[no-untyped-def]
    recorder = RecordingScorer(scorer)
    # No warm-up batch: every pair the recorder sees came from the test's requests.
    overrides.setdefault("score_cache_bytes", 1 << 20)
    settings = test_settings(warmup=False, **overrides)
    return server_factory(settings, scorer=recorder), recorder


def by_index(result) -> list[float]:  # type: ignore[no-untyped-def]
    return [h.score for h in sorted(result.hits, key=lambda h: h.index)]


def test_a_repeated_request_costs_no_forward_pass_and_scores_are_bit_identical(
    server_factory, bert_scorer: Scorer
) -> None:
    srv, recorder = served(server_factory, bert_scorer)
    with RerankerClient(srv.target) as client:
        first = client.rerank(QUERY, DOCS)
        seen = len(recorder.seen)
        second = client.rerank(QUERY, DOCS)
    assert seen == len(DOCS) and len(recorder.seen) == seen  # the repeat reached no model
    assert (first.cached_pairs, second.cached_pairs) == (0, len(DOCS))
    assert second.timings.batches == 0
    assert [h.index for h in second.hits] == [h.index for h in first.hits]
    # Bit-identical, not close: the cached value is the float the model returned.
    assert [s.hex() for s in by_index(second)] == [s.hex() for s in by_index(first)]
    # And those are the model's scores (reference: the scorer called directly, float32 tolerance).
    reference = bert_scorer.score([Pair(QUERY, d) for d in DOCS])
    np.testing.assert_allclose(by_index(first), reference, rtol=1e-5, atol=1e-5)


def test_a_partly_cached_request_sends_only_the_missing_pairs(server_factory, bert_scorer: Scorer) -> None:
    srv, recorder = served(server_factory, bert_scorer)
    extra = ["Mitochondria are the powerhouse of the cell.", "Leaves are green because of chlorophyll."]
    with RerankerClient(srv.target) as client:
        client.rerank(QUERY, DOCS[:2])
        before = len(recorder.seen)
        mixed = client.rerank(QUERY, [*DOCS[:2], *extra], top_n=3)
        fresh = client.rerank(QUERY, [*DOCS[:2], *extra], bypass_cache=True)
    assert [p.document for p in recorder.seen[before : before + 2]] == extra
    assert mixed.cached_pairs == 2 and len(mixed.hits) == 3
    # Fusion/top_n apply after cached and fresh scores are merged: same ranking as a fully fresh request.
    assert [h.index for h in mixed.hits] == [h.index for h in fresh.hits][:3]
    reference = bert_scorer.score([Pair(QUERY, d) for d in [*DOCS[:2], *extra]])
    for h in mixed.hits:
        assert math.isclose(h.score, float(reference[h.index]), rel_tol=1e-5, abs_tol=1e-5)


def test_a_different_instruction_max_length_or_model_misses() -> None:
    info = make_scorer_info()
    base = ScoreCache.keys(info, None, QUERY, DOCS, 64)
    assert len(set(base)) == len(DOCS)
    assert ScoreCache.keys(info, None, QUERY, DOCS, 64) == base
    others = [
        ScoreCache.keys(info, "Given a question, find passages", QUERY, DOCS, 64),
        ScoreCache.keys(info, None, QUERY, DOCS, 32),
        ScoreCache.keys(info, None, QUERY + "?", DOCS, 64),
        ScoreCache.keys(
            info.__class__(**{**info.__dict__, "revision": "sha256:000000000000"}), None, QUERY, DOCS, 64
        ),
        ScoreCache.keys(info.__class__(**{**info.__dict__, "dtype": "bfloat16"}), None, QUERY, DOCS, 64),
        # Fields are length-prefixed: text moved from the query into the instruction is another key.
        ScoreCache.keys(info, "how do", " plants make energy", DOCS, 64),
    ]
    for keys in others:
        assert not set(keys) & set(base)


def make_scorer_info():  # type: ignore[no-untyped-def]
    from sidecar.types import ModelInfo

    return ModelInfo(
        model_id="m",
        revision="sha256:abcdefabcdef",
        backend="cross-encoder",
        device="cpu",
        dtype="float32",
        attention="sdpa",
        max_length=64,
        accepts_instruction=False,
    )


def test_a_different_max_length_misses_through_the_server(server_factory, bert_ce_dir, bert_scorer) -> None:
    """The same weights served at max length 16 key their pairs apart from max length 64 (a truncated
    pair scores differently), and a truncated pair's hit still says `truncated`."""
    short = make_scorer(bert_ce_dir, max_length=16)
    long_doc = " ".join(["photosynthesis in plant leaves"] * 20)
    k64 = ScoreCache.keys(bert_scorer.info, None, QUERY, [long_doc], bert_scorer.info.max_length)
    k16 = ScoreCache.keys(short.info, None, QUERY, [long_doc], short.info.max_length)
    assert k64 != k16
    srv, recorder = served(server_factory, short)
    with RerankerClient(srv.target) as client:
        a = client.rerank(QUERY, [long_doc])
        b = client.rerank(QUERY, [long_doc])
    assert len(recorder.seen) == 1 and b.cached_pairs == 1
    assert a.hits[0].truncated and b.hits[0].truncated  # truncation is remembered with the score
    assert b.hits[0].score == a.hits[0].score


def test_the_byte_bound_evicts_least_recently_used(server_factory, bert_scorer: Scorer) -> None:
    srv, recorder = served(server_factory, bert_scorer, score_cache_bytes=3 * ENTRY_BYTES)
    with RerankerClient(srv.target) as client:
        client.rerank(QUERY, DOCS[:3])
        assert counter(srv, "reranker_score_cache_evictions_total") == 0
        client.rerank(QUERY, DOCS[:1])  # touch DOCS[0]: now most recent
        client.rerank(QUERY, DOCS[3:4])  # a fourth entry pushes out the least recent, DOCS[1]
        assert counter(srv, "reranker_score_cache_evictions_total") == 1
        assert counter(srv, "reranker_score_cache_bytes") == 3 * ENTRY_BYTES
        before = len(recorder.seen)
        again = client.rerank(QUERY, DOCS)
    assert [p.document for p in recorder.seen[before:]] == [DOCS[1]]
    assert again.cached_pairs == 3


def test_bypass_scores_fresh_and_neither_reads_nor_writes(server_factory, bert_scorer: Scorer) -> None:
    srv, recorder = served(server_factory, bert_scorer)
    with RerankerClient(srv.target) as client:
        client.rerank(QUERY, DOCS)
        hits, misses = (counter(srv, f"reranker_score_cache_{n}_total") for n in ("hits", "misses"))
        before = len(recorder.seen)
        bypassed = client.rerank(QUERY, DOCS, bypass_cache=True)
        assert len(recorder.seen) - before == len(DOCS) and bypassed.cached_pairs == 0
        assert counter(srv, "reranker_score_cache_hits_total") == hits
        assert counter(srv, "reranker_score_cache_misses_total") == misses
        # A bypassed request stores nothing: a new pair it scored is still a miss afterwards.
        client.rerank(QUERY, ["Only ever seen by a bypass."], bypass_cache=True)
        assert client.rerank(QUERY, ["Only ever seen by a bypass."]).cached_pairs == 0


def test_metrics_count_hits_and_misses_of_real_traffic(server_factory, bert_scorer: Scorer) -> None:
    srv, _ = served(server_factory, bert_scorer)
    names = ("hits", "misses", "evictions")
    start = {n: counter(srv, f"reranker_score_cache_{n}_total") for n in names}
    with RerankerClient(srv.target) as client:
        client.rerank(QUERY, DOCS[:3])
        client.rerank(QUERY, DOCS)
    delta = {n: counter(srv, f"reranker_score_cache_{n}_total") - start[n] for n in names}
    assert delta == {"hits": 3, "misses": 4, "evictions": 0}
    text = srv.server.metrics.render().decode()
    assert "reranker_score_cache_hits_total 3.0" in text


def test_http_and_grpc_share_the_cache_and_http_takes_bypass(server_factory, bert_scorer: Scorer) -> None:
    srv, recorder = served(server_factory, bert_scorer)
    base = f"http://127.0.0.1:{srv.server.http_port}"
    with RerankerClient(srv.target) as client:
        grpc_result = client.rerank(QUERY, DOCS)
    seen = len(recorder.seen)
    for path in ("/v1/rerank", "/v1/opensearch/rerank", "/v1/opensearch/scores"):
        reply = http_request(base, "POST", path, json.dumps({"query": QUERY, "documents": DOCS}).encode())
        assert reply.status == 200, reply.body
        assert reply.headers["x-rerank-cached"] == str(len(DOCS))
    assert len(recorder.seen) == seen  # every HTTP shape was answered by what gRPC scored
    scores = reply.json()["scores"]
    # The very floats gRPC got, as the scores shape encodes any score for ml-commons.
    assert scores == [mlcommons.encode_score(s) for s in by_index(grpc_result)]
    body = json.dumps({"query": QUERY, "documents": DOCS, "bypass_cache": True}).encode()
    reply = http_request(base, "POST", "/v1/rerank", body)
    assert reply.status == 200 and reply.headers["x-rerank-cached"] == "0"
    assert len(recorder.seen) == seen + len(DOCS)
    bad = http_request(
        base,
        "POST",
        "/v1/rerank",
        json.dumps({"query": QUERY, "documents": DOCS, "bypass_cache": "yes"}).encode(),
    )
    assert bad.status == 422 and "bypass_cache" in bad.json()["error"]["message"]


def test_off_when_zero_bytes(server_factory, bert_scorer: Scorer) -> None:
    srv, recorder = served(server_factory, bert_scorer, score_cache_bytes=0)
    with RerankerClient(srv.target) as client:
        client.rerank(QUERY, DOCS)
        assert client.rerank(QUERY, DOCS).cached_pairs == 0
    assert len(recorder.seen) == 2 * len(DOCS)
    assert srv.server.service.score_cache is None


def test_entry_bytes_is_not_below_what_an_entry_really_costs() -> None:
    """The byte bound is entries x ENTRY_BYTES: measured here so the bound cannot silently undercount."""
    cache = ScoreCache(5_500 * ENTRY_BYTES, Metrics())
    info = make_scorer_info()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    keys = ScoreCache.keys(info, None, QUERY, [f"document {i}" for i in range(5_500)], 64)
    cache.put_many([(k, CachedScore(float(np.float32(i) / 7), bool(i % 2))) for i, k in enumerate(keys)])
    del keys  # what remains is what the cache holds
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_entry = (after - before) / len(cache)
    print(f"score cache: {per_entry:.0f} bytes per entry measured, {ENTRY_BYTES} assumed")
    assert len(cache) == 5_500 and per_entry <= ENTRY_BYTES


def test_cached_model_scores_under_another_fusion_rank_as_a_fresh_request(
    server_factory, bert_scorer: Scorer
) -> None:
    from sidecar.fusion import FusionSpec
    from sidecar.types import Document

    srv, recorder = served(server_factory, bert_scorer)
    docs = [Document(text=t, first_stage_score=float(len(DOCS) - i)) for i, t in enumerate(DOCS)]
    blend = FusionSpec.parse({"method": "blend", "alpha": 0.3})
    with RerankerClient(srv.target) as client:
        client.rerank(QUERY, docs)  # stores the raw model scores
        before = len(recorder.seen)
        cached = client.rerank(QUERY, docs, fusion=blend, top_n=2)
        fresh = client.rerank(QUERY, docs, fusion=blend, top_n=2, bypass_cache=True)
    assert len(recorder.seen) - before == len(DOCS)  # only the bypassed request reached the model
    assert cached.cached_pairs == len(DOCS) and cached.fusion.method.value == "blend"
    assert [h.index for h in cached.hits] == [h.index for h in fresh.hits]
    for a, b in zip(cached.hits, fresh.hits, strict=True):
        assert math.isclose(a.ranking_score, b.ranking_score, rel_tol=1e-5, abs_tol=1e-5)
