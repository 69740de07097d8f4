"""Long documents (setting long_documents=windows, sidecar/windows.py) through real servers and clients.

The reference is computed here, independently of the sidecar: the windows are cut from the Hugging Face
tokenizer's offsets (window = max_length minus the query's pair length, consecutive windows sharing the
overlap), each window is scored with sentence-transformers `CrossEncoder.predict` at float32, and the
document's score is the aggregate of those (tolerance 1e-4).
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from sidecar.client import RerankerClient
from sidecar.metrics import Metrics
from sidecar.score_cache import ENTRY_BYTES, WINDOWED_EXTRA_BYTES, ScoreCache, WindowedScore
from sidecar.scoring.base import Scorer
from sidecar.types import Document
from tests.conftest import make_scorer, test_settings
from tests.fakes import RecordingScorer
from tests.opensearch.conftest import http_request

QUERY = "how do vaccines train the immune system"
SENTENCES = [
    "Vaccines train the immune system to recognise a pathogen.",
    "The stock market fell sharply today after the announcement.",
    "Immunization with an attenuated virus elicits neutralising antibodies.",
    "Protein folding is driven by the hydrophobic effect and hydrogen bonds.",
    "Bananas are rich in potassium and grow in tropical climates.",
    "Memory B cells persist for years after an infection is cleared.",
    "The river flooded the valley twice in one decade.",
]
# About 200 tokens: several windows of a 64-token model.
LONG = " ".join(SENTENCES[(i * 3) % len(SENTENCES)] for i in range(14))
SHORT = "Vaccines teach the immune system."
OVERLAP = 8
TOL = 1e-4


@pytest.fixture(scope="module")
def scorer(bert_ce_dir: Path) -> Scorer:
    return make_scorer(bert_ce_dir, dtype="float32")


@pytest.fixture(scope="module")
def reference(bert_ce_dir: Path):  # type: ignore[no-untyped-def]
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(bert_ce_dir), device="cpu", model_kwargs={"dtype": "float32"})


def reference_windows(  # type: ignore[no-untyped-def]
    ce, document: str, overlap: int = OVERLAP, cap: int = 100, budget: int | None = None
) -> list[tuple[int, int]]:
    """Character spans of the windows, from the tokenizer directly: `budget` tokens beside the query
    (its tokens plus the pair's special tokens), a cut never splits a word when a word boundary lies in
    the window's second half, the next window starts `overlap` tokens before the cut (at a word start)."""
    tok = ce.tokenizer
    if budget is None:
        budget = ce.max_length - len(tok(QUERY, add_special_tokens=False)["input_ids"])
        budget -= tok.num_special_tokens_to_add(pair=True)
    offsets = tok(document, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    n = len(offsets)
    word_starts = {0} | {i for i in range(1, n) if offsets[i][0] != offsets[i - 1][1]} | {n}
    spans, start = [], 0
    while len(spans) < cap:
        end = min(start + budget, n)
        end = max((i for i in word_starts if start + budget // 2 <= i <= end), default=end)
        spans.append((offsets[start][0], offsets[end - 1][1]))
        if end == n:
            break
        nxt = max(end - overlap, start + 1)
        start = max((i for i in word_starts if start + 1 <= i <= nxt), default=nxt)
    return spans


def window_scores(ce, document: str, spans: list[tuple[int, int]]) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(ce.predict([(QUERY, document[a:b]) for a, b in spans]), dtype=np.float64)


def windowed(server_factory, scorer: Scorer, **overrides: object):  # type: ignore[no-untyped-def]
    recorder = RecordingScorer(scorer)
    overrides.setdefault("window_overlap_tokens", OVERLAP)
    settings = test_settings(warmup=False, long_documents="windows", **overrides)
    return server_factory(settings, scorer=recorder), recorder


@pytest.mark.parametrize("how", ["max", "first", "mean_top2"])
def test_a_long_documents_score_is_the_aggregate_of_its_windows_scored_by_the_reference(
    server_factory, scorer: Scorer, reference, how: str
) -> None:
    srv, _ = windowed(server_factory, scorer, window_aggregate=how, max_windows_per_document=32)
    with RerankerClient(srv.target) as client:
        result = client.rerank(QUERY, [LONG, SHORT])
    spans = reference_windows(reference, LONG)
    assert len(spans) >= 3  # the document really is long
    per_window = window_scores(reference, LONG, spans)
    expected = {
        "max": per_window.max(),
        "first": per_window[0],
        "mean_top2": np.sort(per_window)[-2:].mean(),
    }[how]
    long_hit, short_hit = sorted(result.hits, key=lambda h: h.index)
    assert abs(long_hit.score - expected) <= TOL
    assert long_hit.windows == len(spans) and not long_hit.truncated
    winner = 0 if how == "first" else int(per_window.argmax())
    assert (long_hit.passage_start, long_hit.passage_end) == spans[winner]
    assert LONG[long_hit.passage_start : long_hit.passage_end] == LONG[slice(*spans[winner])]
    # A document that fits is scored whole, as without windows.
    assert abs(short_hit.score - float(reference.predict([(QUERY, SHORT)])[0])) <= TOL
    assert (short_hit.passage_start, short_hit.passage_end, short_hit.windows) == (None, None, 1)


def test_truncation_stays_the_default_and_is_unchanged(server_factory, scorer: Scorer, reference) -> None:
    srv = server_factory(test_settings(warmup=False), scorer=scorer)
    with RerankerClient(srv.target) as client:
        (hit,) = client.rerank(QUERY, [LONG]).hits
    # CrossEncoder.predict truncates the pair to max_length itself.
    assert abs(hit.score - float(reference.predict([(QUERY, LONG)])[0])) <= TOL
    assert hit.truncated and hit.windows == 1 and hit.passage_start is None


def test_the_request_and_server_caps_bound_the_windows_scored(
    server_factory, scorer: Scorer, reference
) -> None:
    spans = reference_windows(reference, LONG)
    per_window = window_scores(reference, LONG, spans)
    srv, recorder = windowed(server_factory, scorer, max_windows_per_document=3)
    with RerankerClient(srv.target) as client:
        asked_two = client.rerank(QUERY, [LONG], max_windows=2).hits[0]
        seen_two = len(recorder.seen)
        asked_ten = client.rerank(QUERY, [LONG], max_windows=10).hits[0]
    assert asked_two.windows == 2 and seen_two == 2 and asked_two.truncated  # text was left unread
    assert abs(asked_two.score - per_window[:2].max()) <= TOL
    assert asked_ten.windows == 3 and len(recorder.seen) == 2 + 3  # the server's cap wins
    assert abs(asked_ten.score - per_window[:3].max()) <= TOL
    registry = srv.server.metrics.registry
    assert registry.get_sample_value("reranker_document_windows_total") == 2 + 3
    assert registry.get_sample_value("reranker_documents_truncated_total") == 2  # both left text unread


def test_the_batchers_token_budget_counts_windows(server_factory, scorer: Scorer, reference) -> None:
    # A budget of one full-length pair per batch: every window is its own forward pass.
    n = len(reference_windows(reference, LONG))
    srv, recorder = windowed(server_factory, scorer, max_batch_tokens=64, max_windows_per_document=32)
    with RerankerClient(srv.target) as client:
        result = client.rerank(QUERY, [LONG])
    assert result.timings.batches == n and [len(b) for b in recorder.batches] == [1] * n


def test_the_score_cache_tells_window_settings_apart(server_factory, scorer: Scorer) -> None:
    srv, recorder = windowed(server_factory, scorer, score_cache_bytes=1 << 20)
    with RerankerClient(srv.target) as client:
        two = client.rerank(QUERY, [LONG, SHORT], max_windows=2)
        three = client.rerank(QUERY, [LONG, SHORT], max_windows=3)
        again = client.rerank(QUERY, [LONG, SHORT], max_windows=3)
    # The short document does not depend on windowing but the key includes the settings: a miss.
    assert (two.cached_pairs, three.cached_pairs, again.cached_pairs) == (0, 0, 2)
    assert two.hits != three.hits or two.hits[0].windows != three.hits[0].windows
    long_three = next(h for h in three.hits if h.index == 0)
    long_again = next(h for h in again.hits if h.index == 0)
    assert long_three.windows == 3 and long_again == long_three  # passage fields come back from the cache
    assert len(recorder.seen) == (2 + 1) + (3 + 1)


def test_http_mirrors_max_windows_and_reports_the_passage(server_factory, scorer: Scorer, reference) -> None:
    srv, _ = windowed(server_factory, scorer, max_windows_per_document=32)
    base = f"http://127.0.0.1:{srv.server.http_port}"
    body = {"query": QUERY, "documents": [SHORT, LONG], "max_windows": 2}
    reply = http_request(base, "POST", "/v1/rerank", json.dumps(body).encode())
    assert reply.status == 200, reply.body
    results = {r["index"]: r for r in json.loads(reply.body)["results"]}
    spans = reference_windows(reference, LONG)[:2]
    winner = spans[int(window_scores(reference, LONG, spans).argmax())]
    assert (results[1]["passage_start"], results[1]["passage_end"], results[1]["windows"]) == (*winner, 2)
    assert "passage_start" not in results[0]
    bad = http_request(base, "POST", "/v1/rerank", json.dumps({**body, "max_windows": 0}).encode())
    assert bad.status in (400, 422) and "max_windows" in json.loads(bad.body)["error"]["message"]


def test_offsets_count_from_the_text_when_a_title_is_set(server_factory, scorer: Scorer) -> None:
    srv, _ = windowed(server_factory, scorer, window_aggregate="first")
    with RerankerClient(srv.target) as client:
        (hit,) = client.rerank(QUERY, [Document(text=LONG, title="Vaccines")]).hits
    # The first window begins in the title, so it begins at 0 of `text`.
    assert hit.passage_start == 0 and 0 < hit.passage_end < len(LONG)


def test_a_bi_encoder_windows_the_document_alone(server_factory, packaged_model_dir: Path) -> None:
    """The bi-encoder embeds the document without the query: a window is max_length minus the special
    tokens. Reference: SentenceTransformer.encode cosine per window, the max."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(packaged_model_dir), device="cpu", model_kwargs={"dtype": "float32"})
    st.max_seq_length = 32
    scorer = make_scorer(packaged_model_dir, dtype="float32", max_length=32, embedding_cache_bytes=0)
    srv, _ = windowed(server_factory, scorer, max_windows_per_document=32)
    with RerankerClient(srv.target) as client:
        (hit,) = client.rerank(QUERY, [LONG]).hits
    spans = reference_windows(st, LONG, budget=32 - st.tokenizer.num_special_tokens_to_add(pair=False))
    emb = st.encode([QUERY, *(LONG[a:b] for a, b in spans)], normalize_embeddings=True)
    cosines = emb[1:] @ emb[0]
    assert len(spans) >= 5 and hit.windows == len(spans)
    assert abs(hit.score - float(cosines.max())) <= TOL
    assert (hit.passage_start, hit.passage_end) == spans[int(cosines.argmax())]


def test_windowed_cache_entries_are_counted_at_what_they_really_cost(scorer: Scorer) -> None:
    """The byte bound holds with windowed entries (measured here, as tests/test_score_cache.py measures
    plain ones), and a windowed entry evicts more than a plain one's worth."""
    n = 5_500
    cache = ScoreCache(n * (ENTRY_BYTES + WINDOWED_EXTRA_BYTES), Metrics())
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    keys = ScoreCache.keys(
        scorer.info, None, QUERY, [f"document {i}" for i in range(n)], 64, "windows/8/4/max"
    )
    cache.put_many(
        [
            (k, WindowedScore(float(np.float32(i) / 7), bool(i % 2), 1000 + i, 5000 + i, 3))
            for i, k in enumerate(keys)
        ]
    )
    del keys  # what remains is what the cache holds
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_entry = (after - before) / len(cache)
    print(
        f"windowed score cache entry: {per_entry:.0f} bytes measured, "
        f"{ENTRY_BYTES + WINDOWED_EXTRA_BYTES} assumed"
    )
    assert len(cache) == n and per_entry <= ENTRY_BYTES + WINDOWED_EXTRA_BYTES
    assert cache.bytes_held == n * (ENTRY_BYTES + WINDOWED_EXTRA_BYTES)
    cache.put_many([(b"x" * 32, WindowedScore(0.5, False, 0, 10, 2))])
    assert len(cache) == n  # one more windowed entry evicts one
