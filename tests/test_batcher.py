"""The batcher: shared batches across requests, token budgets, bounded queue, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from sidecar.batcher import Batcher, Progress
from sidecar.errors import DeadlineExceeded, InternalError, Overloaded
from sidecar.metrics import Metrics
from sidecar.scoring.base import Pair, Scorer
from tests.fakes import FailingScorer, RecordingScorer, break_batcher_loop
from tests.texts import documents, queries


def _batcher(scorer: Scorer, **kw: float) -> Batcher:
    opts: dict = {
        "max_batch_tokens": 2048,
        "max_batch_pairs": 64,
        "max_wait_s": 0.02,
        "max_queue_pairs": 10_000,
    }
    opts.update(kw)
    return Batcher(scorer, Metrics(), **opts)


def _request(scorer: Scorer, q: str) -> tuple[list[Pair], list[int]]:
    pairs = [Pair(q, d) for d in documents(24)]
    return pairs, [m.tokens for m in scorer.measure(pairs)]


def test_concurrent_requests_share_batches_and_equal_solo_scores(bert_scorer: Scorer) -> None:
    rec = RecordingScorer(bert_scorer)

    async def main() -> list[np.ndarray]:
        b = _batcher(rec)
        b.start()
        loop = asyncio.get_running_loop()
        reqs = [_request(bert_scorer, q) for q in queries(3)]
        results = await asyncio.gather(*(b.submit(p, t, loop.time() + 60) for p, t in reqs))
        await b.close()
        return [scores for scores, _ in results]

    together = asyncio.run(main())
    # Some batch held pairs of more than one request.
    assert max(len({p.query for p in batch}) for batch in rec.batches) > 1
    for q, scores in zip(queries(3), together, strict=True):
        alone = bert_scorer.score([Pair(q, d) for d in documents(24)])
        np.testing.assert_allclose(scores, alone, atol=1e-5)


def test_batches_respect_token_budget_and_are_length_sorted(bert_scorer: Scorer) -> None:
    rec = RecordingScorer(bert_scorer)
    budget = 256

    async def main() -> None:
        b = _batcher(rec, max_batch_tokens=budget)
        b.start()
        loop = asyncio.get_running_loop()
        pairs, tokens = _request(bert_scorer, queries(1)[0])
        await b.submit(pairs, tokens, loop.time() + 60)
        await b.close()

    asyncio.run(main())
    assert len(rec.batches) > 1  # the request was split
    for batch in rec.batches:
        lengths = [m.tokens for m in bert_scorer.measure(batch)]
        assert len(batch) * max(lengths) <= budget or len(batch) == 1
        assert lengths == sorted(lengths, reverse=True)


def test_large_request_is_split_not_refused(bert_scorer: Scorer) -> None:
    async def main() -> np.ndarray:
        b = _batcher(bert_scorer, max_batch_tokens=1024)
        b.start()
        pairs = [Pair("q", f"document number {i} " * (1 + i % 7)) for i in range(1000)]
        tokens = [m.tokens for m in bert_scorer.measure(pairs)]
        scores, stats = await b.submit(pairs, tokens, asyncio.get_running_loop().time() + 120)
        await b.close()
        assert stats.batches > 1
        return scores

    scores = asyncio.run(main())
    assert scores.shape == (1000,) and np.isfinite(scores).all()


def test_full_queue_refuses_at_once(bert_scorer: Scorer) -> None:
    gate = threading.Event()
    rec = RecordingScorer(bert_scorer, gate)

    async def main() -> None:
        b = _batcher(rec, max_queue_pairs=30, max_wait_s=0)
        b.start()
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(b.submit(*_request(bert_scorer, "a"), loop.time() + 60))
        while not rec.entered.is_set():
            await asyncio.sleep(0.01)
        # 24 pairs of `first` are taken into the model; 24 more fit, the next 24 do not.
        second = asyncio.create_task(b.submit(*_request(bert_scorer, "b"), loop.time() + 60))
        await asyncio.sleep(0.05)
        t0 = loop.time()
        with pytest.raises(Overloaded, match="queue full"):
            await b.submit(*_request(bert_scorer, "c"), loop.time() + 60)
        assert loop.time() - t0 < 0.5
        gate.set()
        await asyncio.gather(first, second)
        await b.close()

    asyncio.run(main())


def test_expired_and_cancelled_work_never_reaches_the_model(bert_scorer: Scorer) -> None:
    gate = threading.Event()
    rec = RecordingScorer(bert_scorer, gate)

    async def main() -> None:
        b = _batcher(rec, max_wait_s=0)
        b.start()
        loop = asyncio.get_running_loop()
        blocker = asyncio.create_task(b.submit([Pair("blocker", "x")], [4], loop.time() + 60))
        while not rec.entered.is_set():
            await asyncio.sleep(0.01)
        expiring = asyncio.create_task(b.submit(*_request(bert_scorer, "expires"), loop.time() + 0.05))
        cancelled = asyncio.create_task(b.submit(*_request(bert_scorer, "cancelled"), loop.time() + 60))
        await asyncio.sleep(0.1)
        cancelled.cancel()
        await asyncio.sleep(0.05)
        assert b.queued_pairs == 24  # the cancelled request's capacity came back at once
        gate.set()
        await blocker
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            await expiring
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await b.close()

    asyncio.run(main())
    seen_queries = {p.query for p in rec.seen}
    assert seen_queries == {"blocker"}


def test_a_failed_batch_returns_its_queue_capacity(bert_scorer: Scorer) -> None:
    failing = FailingScorer(bert_scorer, poison="boom")

    async def main() -> None:
        b = _batcher(failing, max_queue_pairs=100, max_batch_pairs=10, max_wait_s=0)
        b.start()
        loop = asyncio.get_running_loop()
        doomed = [Pair("boom", d) for d in documents(50)]
        with pytest.raises(InternalError):
            await b.submit(doomed, [m.tokens for m in bert_scorer.measure(doomed)], loop.time() + 60)
        await asyncio.sleep(0.05)
        assert b.queued_pairs == 0  # the failed request's 40 unscored pairs gave their capacity back
        assert b.metrics.queue_pairs._value.get() == 0  # type: ignore[attr-defined]
        # 61 pairs fit a 100-pair queue again (they were refused "queue full" before).
        pairs = [Pair("fine", d) for d in documents(61)]
        scores, _ = await b.submit(pairs, [m.tokens for m in bert_scorer.measure(pairs)], loop.time() + 60)
        assert scores.shape == (61,)
        await b.close()

    asyncio.run(main())
    assert len(failing.batches) >= 2  # the failed batch, then the good request's batches
    assert not any(p.query == "boom" for batch in failing.batches[1:] for p in batch)


def test_a_dead_batcher_loop_fails_waiting_requests_at_once_and_refuses_new_ones(bert_scorer: Scorer) -> None:
    gate = threading.Event()
    rec = RecordingScorer(bert_scorer, gate)

    async def main() -> None:
        b = _batcher(rec, max_wait_s=0)
        b.start()
        loop = asyncio.get_running_loop()
        running = asyncio.create_task(b.submit([Pair("first", "x")], [4], loop.time() + 60))
        while not rec.entered.is_set():
            await asyncio.sleep(0.01)
        waiting = asyncio.create_task(b.submit(*_request(bert_scorer, "waiting"), loop.time() + 60))
        await asyncio.sleep(0.05)
        break_batcher_loop(b)
        gate.set()
        t0 = loop.time()
        with pytest.raises(InternalError):
            await waiting  # at once, not at its 60 s deadline
        assert loop.time() - t0 < 30
        assert (await running)[0].shape == (1,)  # its batch had finished before the loop broke
        assert isinstance(await b.failed, RuntimeError)
        with pytest.raises(InternalError):
            await b.submit([Pair("later", "x")], [4], loop.time() + 60)
        await b.close()

    asyncio.run(main())


def test_progress_jobs_are_scored_head_first_even_when_topping_up(bert_scorer: Scorer) -> None:
    """A job with a Progress (partial results) is scored in queue order, whether it leads a batch or tops
    up another's, and its scores land in the Progress as they come."""
    rec = RecordingScorer(bert_scorer)
    # Lengths out of order, so longest-first would not be queue order.
    docs = [" ".join(d.split()[: 3 + (7 * i) % 23]) for i, d in enumerate(documents(24))]

    async def main() -> list[tuple[np.ndarray, Progress]]:
        b = _batcher(rec, max_batch_tokens=256, max_wait_s=0.05)
        b.start()
        loop = asyncio.get_running_loop()
        out = []
        for q in ("first", "second"):
            pairs = [Pair(q, d) for d in docs]
            progress = Progress.of(len(pairs))
            tokens = [m.tokens for m in bert_scorer.measure(pairs)]
            out.append((b.submit(pairs, tokens, loop.time() + 60, progress), progress))
        results = await asyncio.gather(*(c for c, _ in out))
        await b.close()
        return [(scores, p) for (scores, _), (_, p) in zip(results, out, strict=True)]

    done = asyncio.run(main())
    for q, (scores, progress) in zip(("first", "second"), done, strict=True):
        assert progress.done.all()
        np.testing.assert_array_equal(progress.scores, scores)
        seen: list[int] = []
        for batch in rec.batches:
            seen += sorted(docs.index(p.document) for p in batch if p.query == q)
            assert sorted(seen) == list(range(len(seen))), f"{q}: scored {seen} is not a head of the queue"
    assert any(len({p.query for p in batch}) > 1 for batch in rec.batches)  # the second topped up
