"""Reference parity: our scorers equal sentence-transformers within 1e-4 (fp32), whatever the batch
composition and padding (one batch, one pair at a time, shuffled mixed-length batches)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from sidecar.scoring.base import Pair, Scorer
from tests.conftest import make_scorer
from tests.texts import documents, queries

TOL = 1e-4


def _pairs() -> list[Pair]:
    return [Pair(q, d) for q in queries(3) for d in documents(8)]


def _compositions(scorer: Scorer, pairs: list[Pair]) -> dict[str, np.ndarray]:
    out = {"one batch": scorer.score(pairs)}
    out["one at a time"] = np.concatenate([scorer.score([p]) for p in pairs])
    rng = random.Random(0)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    shuffled = np.empty(len(pairs), dtype=np.float32)
    for start in range(0, len(order), 5):
        chunk = order[start : start + 5]
        shuffled[chunk] = scorer.score([pairs[i] for i in chunk])
    out["shuffled batches of 5"] = shuffled
    return out


@pytest.mark.parametrize("model_fixture", ["bert_ce_dir", "modernbert_ce_dir"])
def test_cross_encoder_matches_sentence_transformers(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    from sentence_transformers import CrossEncoder

    model_dir: Path = request.getfixturevalue(model_fixture)
    pairs = _pairs()
    reference = CrossEncoder(str(model_dir), device="cpu").predict(
        [(p.query, p.document) for p in pairs], batch_size=32
    )
    assert np.std(reference) > 1e-3, "random test model gives flat scores; the comparison would be vacuous"
    scorer = make_scorer(model_dir)
    assert scorer.info.backend == "cross-encoder"
    assert any(m.truncated for m in scorer.measure(pairs)) or model_fixture != "bert_ce_dir"
    for name, scores in _compositions(scorer, pairs).items():
        np.testing.assert_allclose(scores, reference, atol=TOL, rtol=0, err_msg=name)


def test_bi_encoder_matches_sentence_transformers_cosine(
    packaged_model_dir: Path, packaged_scorer: Scorer
) -> None:
    from sentence_transformers import SentenceTransformer

    pairs = _pairs()
    st = SentenceTransformer(str(packaged_model_dir), device="cpu")
    q = st.encode([p.query for p in pairs], convert_to_numpy=True)
    d = st.encode([p.document for p in pairs], convert_to_numpy=True)
    reference = (q * d).sum(1) / (np.linalg.norm(q, axis=1) * np.linalg.norm(d, axis=1))
    assert packaged_scorer.info.backend == "bi-encoder"
    for name, scores in _compositions(packaged_scorer, pairs).items():
        np.testing.assert_allclose(scores, reference, atol=TOL, rtol=0, err_msg=name)


def test_packaged_model_ranks_meaningfully(packaged_scorer: Scorer) -> None:
    docs = [
        "The stock market fell sharply after the central bank raised interest rates.",
        "Vaccines train the immune system to recognise and fight a specific pathogen.",
        "A recipe for banana bread with walnuts.",
    ]
    scores = packaged_scorer.score([Pair("how do vaccines protect against disease", d) for d in docs])
    assert int(np.argmax(scores)) == 1


def test_truncation_is_reported(bert_scorer: Scorer) -> None:
    long_doc = "protein folding " * 200
    m = bert_scorer.measure([Pair("q", "short doc"), Pair("q", long_doc)])
    assert not m[0].truncated and m[1].truncated
    assert m[1].tokens == bert_scorer.info.max_length == 64


def test_bi_encoder_document_cache_keeps_scores_and_skips_work(packaged_model_dir: Path) -> None:
    cached = make_scorer(None, embedding_cache_bytes=5 * (384 * 4 + 384))
    uncached = make_scorer(None, embedding_cache_bytes=0)
    # As the service does: the pairs measure clipped to what the model reads are the ones scored.
    pairs = [m.clipped or p for p, m in zip(_pairs(), cached.measure(_pairs()), strict=True)]
    first = cached.score(pairs)
    assert len(cached.cache) == 5  # type: ignore[attr-defined]  # bounded: the oldest were evicted
    again = cached.score(pairs[-5:])
    np.testing.assert_allclose(again, first[-5:], atol=1e-6)
    np.testing.assert_allclose(first, uncached.score(pairs), atol=TOL)
    # Cached documents are announced to the batcher as (almost) free.
    assert [m.tokens for m in cached.measure(pairs[-3:])] == [1, 1, 1]
