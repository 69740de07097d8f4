"""Tokenize once: the encodings `measure` makes in the tokenize threads are what sentence-transformers'
`preprocess` gives (token ids, segment ids, padding, truncation), the model thread scores from them
without touching a tokenizer, and the scores equal `CrossEncoder.predict` / `SentenceTransformer.encode`
(float32, 1e-5). The batcher forms the next batch while one runs, so the model thread goes from one
batch straight to the next even while the event loop is busy.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sidecar.batcher import Batcher
from sidecar.client import RerankerClient
from sidecar.metrics import Metrics
from sidecar.scoring.base import Pair
from sidecar.scoring.encodings import collate
from tests.conftest import make_scorer, test_settings
from tests.fakes import BatchGate, RecordingScorer
from tests.texts import documents, queries

TOL = 1e-5
MAX_LENGTH = 64


class Untouchable:
    """Stands in for a tokenizer that must not be used: any use raises."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the tokenizer was used ({name}) after measuring")

    def __call__(self, *args: object, **kwargs: object) -> object:
        raise AssertionError("the tokenizer was called after measuring")


class NotInTheModelThread:
    """A REAL tokenizer that refuses to work in the model thread (the batcher's `scorer` thread)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def _check(self) -> None:
        if threading.current_thread().name.startswith("scorer"):
            raise AssertionError("the model thread tokenized")

    def __getattr__(self, name: str) -> object:
        self._check()
        return getattr(self.inner, name)

    def __call__(self, *args: object, **kwargs: object) -> object:
        self._check()
        return self.inner(*args, **kwargs)  # type: ignore[operator]


def _boundary_document(tokenizer, query: str, length: int) -> str:  # type: ignore[no-untyped-def]
    """A document whose pair with `query` is exactly `length` tokens: read whole, not truncated."""
    words = " ".join(documents(40)).split()
    for n in range(1, len(words)):
        doc = " ".join(words[:n])
        size = len(tokenizer(query, doc)["input_ids"])
        if size == length:
            return doc
        if size > length:
            break
    raise AssertionError("no prefix tokenizes to the boundary length")


def _pairs(tokenizer) -> list[Pair]:  # type: ignore[no-untyped-def]
    q = queries(1)[0]
    pairs = [Pair(q2, d) for q2 in queries(2) for d in documents(6)]
    pairs.append(Pair(q, _boundary_document(tokenizer, q, MAX_LENGTH)))  # exactly full: not truncated
    pairs.append(Pair(q, " ".join(documents(30))))  # clipped and truncated
    pairs.append(Pair(" ".join(documents(4)), "short document"))  # the query is what gets cut
    return pairs


@pytest.fixture(scope="module")
def ce_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sidecar.model_factory import build_bert_cross_encoder

    return build_bert_cross_encoder(tmp_path_factory.mktemp("models") / "ce", max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def reference(ce_dir: Path):  # type: ignore[no-untyped-def]
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(ce_dir), device="cpu", model_kwargs={"dtype": "float32"})


@pytest.mark.parametrize("model_fixture", ["ce_dir", "modernbert_ce_dir"])
def test_encodings_are_what_sentence_transformers_preprocess_gives(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    import torch
    from sentence_transformers import CrossEncoder

    model_dir: Path = request.getfixturevalue(model_fixture)
    ce = CrossEncoder(str(model_dir), device="cpu", max_length=MAX_LENGTH)
    scorer = make_scorer(model_dir, dtype="float32", max_length=MAX_LENGTH)
    pairs = _pairs(ce.tokenizer)
    measures = scorer.measure(pairs)
    # Truncation as the tokenizer counts it untruncated; the boundary pair fills max_length unread-free.
    full = [len(ce.tokenizer(p.query, p.document)["input_ids"]) for p in pairs]
    assert [m.truncated for m in measures] == [n > MAX_LENGTH for n in full]
    assert full[-3] == MAX_LENGTH and measures[-2].truncated and measures[-1].truncated
    assert [m.tokens for m in measures] == [min(n, MAX_LENGTH) for n in full]
    # Each pair alone and the whole batch padded together, against preprocess of the same texts.
    texts = [(p.query, p.document) for p in pairs]
    for rows in [[i] for i in range(len(pairs))] + [list(range(len(pairs)))]:
        ours = collate([measures[i].encoding for i in rows], scorer._padding)  # type: ignore[attr-defined,misc]
        theirs = ce.preprocess([texts[i] for i in rows])
        tensors = {k: v for k, v in theirs.items() if isinstance(v, torch.Tensor)}
        assert tensors.keys() == ours.keys()
        for key, value in ours.items():
            assert torch.equal(value, tensors[key]), (key, rows)


def test_scoring_from_encodings_never_touches_a_tokenizer(ce_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    scorer = make_scorer(ce_dir, dtype="float32")
    pairs = _pairs(reference.tokenizer)
    encodings = [m.encoding for m in scorer.measure(pairs)]
    expected = reference.predict([(p.query, p.document) for p in pairs], batch_size=8)
    assert np.std(expected) > 1e-3, "flat scores would make the comparison vacuous"
    scorer.model[0].processor = Untouchable()  # type: ignore[attr-defined]
    scorer._measure_tokenizer = Untouchable()  # type: ignore[attr-defined]
    np.testing.assert_allclose(scorer.score(pairs, encodings), expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(scorer.score(pairs[:5], encodings[:5]), expected[:5], atol=TOL, rtol=0)
    with pytest.raises((AssertionError, RuntimeError), match=r"tokenizer was used|Untouchable"):
        scorer.score(pairs)  # without encodings it tokenizes, as before


def test_a_bi_encoder_scores_from_encodings_without_a_tokenizer(packaged_model_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(packaged_model_dir), device="cpu", model_kwargs={"dtype": "float32"})
    st.max_seq_length = 32
    scorer = make_scorer(packaged_model_dir, dtype="float32", max_length=32)
    pairs = [Pair(q, d) for q in queries(2) for d in documents(5)] + [Pair("q", " ".join(documents(9)))]
    measures = scorer.measure(pairs)
    assert measures[-1].truncated and not measures[0].truncated
    docs = [p.document for p in pairs]
    q_emb = st.encode([p.query for p in pairs], normalize_embeddings=True)
    d_emb = st.encode(docs, normalize_embeddings=True)
    expected = (q_emb * d_emb).sum(axis=1)
    scorer.model[0].processor = Untouchable()  # type: ignore[attr-defined]
    scorer._measure_tokenizer = Untouchable()  # type: ignore[attr-defined]
    encodings = [m.encoding for m in measures]
    np.testing.assert_allclose(scorer.score(pairs, encodings), expected, atol=TOL, rtol=0)
    # Again from the embedding cache for the documents, and the query alone from its encoding.
    np.testing.assert_allclose(scorer.score(pairs, encodings), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("long_documents", ["truncate", "windows"])
def test_the_model_thread_of_a_running_server_never_tokenizes(
    server_factory, ce_dir: Path, reference, long_documents: str
) -> None:
    scorer = make_scorer(ce_dir, dtype="float32")
    scorer.model[0].processor = Untouchable()  # type: ignore[attr-defined]
    scorer._measure_tokenizer = NotInTheModelThread(scorer._measure_tokenizer)  # type: ignore[attr-defined]
    srv = server_factory(
        test_settings(warmup=True, long_documents=long_documents, max_batch_tokens=512), scorer=scorer
    )
    q = queries(1)[0]
    docs = [*documents(12), " ".join(documents(3))]  # the last one is long: truncated or windowed
    with RerankerClient(srv.target) as client:
        hits = sorted(client.rerank(q, docs).hits, key=lambda h: h.index)
    # Every document that fits is scored whole, windows or not.
    fits = [i for i, d in enumerate(docs) if len(reference.tokenizer(q, d)["input_ids"]) <= MAX_LENGTH]
    assert len(fits) >= 3
    expected = reference.predict([(q, docs[i]) for i in fits])
    np.testing.assert_allclose([hits[i].score for i in fits], expected, atol=TOL, rtol=0)
    if long_documents == "truncate":
        assert hits[-1].truncated and hits[-1].windows == 1
        assert abs(hits[-1].score - float(reference.predict([(q, docs[-1])])[0])) <= TOL
    else:
        assert hits[-1].windows > 1  # split, each window scored from its own encoding


@pytest.mark.parametrize("depth", [2, 1])
def test_the_model_thread_starts_the_next_batch_while_the_loop_is_busy(ce_dir: Path, depth: int) -> None:
    """With the next batch formed while one runs (depth 2), the model thread moves on to it on its own;
    formed only after (depth 1), it waits for the event loop."""
    scorer = make_scorer(ce_dir, dtype="float32")
    gate = BatchGate()
    rec = RecordingScorer(scorer, gate)
    pairs = [Pair("q", d) for d in documents(24)]
    measures = scorer.measure(pairs)

    async def main() -> int:
        b = Batcher(
            rec, Metrics(), max_batch_tokens=256, max_batch_pairs=8, max_wait_s=0, max_queue_pairs=100
        )
        b.pipeline_depth = depth
        b.start()
        loop = asyncio.get_running_loop()
        job = asyncio.create_task(
            b.submit(
                pairs, [m.tokens for m in measures], loop.time() + 60, None, [m.encoding for m in measures]
            )
        )
        while not rec.entered.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the loop forms what it will while the first batch is held
        gate.allow(2)
        time.sleep(1.0)  # the event loop is busy: nothing it has not already handed over can start
        started = len(rec.batches)
        gate.open()
        scores, _ = await job
        await b.close()
        np.testing.assert_allclose(scores, scorer.score(pairs), atol=TOL, rtol=0)
        return started

    assert asyncio.run(main()) == depth


def test_a_formed_batch_drops_what_was_cancelled_while_it_waited(ce_dir: Path) -> None:
    scorer = make_scorer(ce_dir, dtype="float32")
    gate = BatchGate()
    rec = RecordingScorer(scorer, gate)

    async def main() -> None:
        b = Batcher(
            rec, Metrics(), max_batch_tokens=512, max_batch_pairs=8, max_wait_s=0, max_queue_pairs=100
        )
        b.start()
        loop = asyncio.get_running_loop()

        def submit(q: str, n: int) -> asyncio.Task:  # type: ignore[type-arg]
            pairs = [Pair(q, d) for d in documents(n)]
            ms = scorer.measure(pairs)
            return asyncio.create_task(
                b.submit(pairs, [m.tokens for m in ms], loop.time() + 60, None, [m.encoding for m in ms])
            )

        first = submit("first", 8)
        while not rec.entered.is_set():
            await asyncio.sleep(0.01)
        doomed = submit("doomed", 16)  # a full batch queued: formed while the first runs
        await asyncio.sleep(0.1)
        assert b.queued_pairs == 16  # formed, not yet in the model: still counted as queued
        doomed.cancel()
        await asyncio.sleep(0.05)
        assert b.queued_pairs == 0
        later = submit("later", 4)
        gate.open()
        await first
        await later
        with pytest.raises(asyncio.CancelledError):
            await doomed
        await b.close()

    asyncio.run(main())
    assert "doomed" not in {p.query for p in rec.seen}
    assert {p.query for p in rec.seen} == {"first", "later"}
