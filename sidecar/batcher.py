"""The batcher: the only place where requests meet.

Every (query, document) pair is queued on its own, so pairs from concurrent requests share forward
passes. Each step scores the oldest request's longest remaining pairs within the token budget and tops
the batch up with other requests' pairs no longer than those (no added padding): requests finish in
arrival order, batches are length-sorted, and small requests pack together.
The queue is bounded in pairs and refuses at once when full. Pairs whose request expired or was
cancelled are dropped before they reach the model. The model runs in one worker thread; the event loop
never blocks on it, and forms the next batch while one runs so the model thread never waits for it.
Each pair carries the encoding its request's measuring made, so the model thread does not tokenize.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from sidecar.errors import DeadlineExceeded, InternalError, InvalidInput, NotReady, Overloaded
from sidecar.metrics import Metrics
from sidecar.scoring.base import Pair, Scorer

log = logging.getLogger(__name__)

# The window of the queue considered for one batch, in multiples of the token budget: wider windows
# sort better (less padding) at the cost of a longer scan.
WINDOW_BUDGETS = 4
# Batches out to the model thread at once: the one running and the one formed to follow it.
PIPELINE_DEPTH = 2


def batch_cost(lengths: Sequence[int], padding_free: bool) -> int:
    """Tokens a batch of pairs of these lengths costs the model, what `max_batch_tokens` bounds: padded,
    every pair counts as long as the longest; packed without padding (a scorer with `padding_free`, the
    CUDA flash-attn path of sidecar/scoring/packing.py), only the real tokens count."""
    if not lengths:
        return 0
    return sum(lengths) if padding_free else len(lengths) * max(lengths)


@dataclass
class BatchStats:
    """What one job went through, for the response's timings."""

    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    batches: int = 0


@dataclass(eq=False)
class Progress:
    """A job's scores as its batches finish, for a request that may be answered with part of them at its
    deadline (partial results, README "Partial results"). Its job is scheduled in queue order, not
    longest first, so what is scored first is the head of the list the service queued."""

    scores: np.ndarray
    done: np.ndarray  # bool per pair: scores[i] holds the model's score

    @classmethod
    def of(cls, n: int) -> Progress:
        return cls(np.zeros(n, dtype=np.float32), np.zeros(n, dtype=bool))


@dataclass(eq=False)
class _Job:
    pairs: Sequence[Pair]
    deadline: float
    enqueued_at: float
    future: asyncio.Future[np.ndarray]
    scores: np.ndarray
    remaining: int
    queued: int  # items of this job still in the queue
    stats: BatchStats = field(default_factory=BatchStats)
    abandoned: bool = False  # cancelled by the client or timed out in the front end
    progress: Progress | None = None  # set: scored in queue order, each score published as it comes
    encodings: Sequence[object | None] | None = None  # per pair, Measure.encoding (tokenized once)
    # Set by the model thread when one of its batches failed: a batch formed to follow drops its pairs
    # before the loop has answered the failure.
    failed_in_model: bool = False
    # A cascade's first pass (settings.cascade): scored by the scorer's fast engine. A batch holds pairs
    # of one pass only.
    first_pass: bool = False

    @property
    def dead(self) -> bool:
        return self.abandoned or self.future.done()


@dataclass(eq=False)
class _Item:
    job: _Job
    index: int
    tokens: int


class _Ran(NamedTuple):
    """A batch back from the model thread: the pairs it scored (those still wanted when it started),
    their scores, and when it started and ended (loop time)."""

    items: list[_Item]
    scores: np.ndarray
    started: float
    ended: float


class Batcher:
    def __init__(
        self,
        scorer: Scorer,
        metrics: Metrics,
        *,
        max_batch_tokens: int,
        max_batch_pairs: int,
        max_wait_s: float,
        max_queue_pairs: int,
    ) -> None:
        self.scorer = scorer
        self.metrics = metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_pairs = max_batch_pairs
        self.max_wait_s = max_wait_s
        self.max_queue_pairs = max_queue_pairs
        # A scorer that packs batches without padding pays only for real tokens (`batch_cost`).
        self.padding_free = bool(getattr(scorer, "padding_free", False))
        self._queue: deque[_Item] = deque()
        self._queued_pairs = 0
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._running: set[_Job] = set()  # jobs with pairs in the batches out to the model thread
        self.pipeline_depth = PIPELINE_DEPTH  # 1: each batch is formed after the last one ended
        # Resolved with the exception that stopped the loop, if one ever does.
        self.failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        # Batch log for tests and debugging: (number of pairs, number of distinct jobs) per batch.
        self.batch_log: deque[tuple[int, int]] = deque(maxlen=1000)

    # ---- public -------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    @property
    def queued_pairs(self) -> int:
        return self._queued_pairs

    async def submit(
        self,
        pairs: Sequence[Pair],
        tokens: Sequence[int],
        deadline: float,
        progress: Progress | None = None,
        encodings: Sequence[object | None] | None = None,
        first_pass: bool = False,
    ) -> tuple[np.ndarray, BatchStats]:
        """Score `pairs` (with their token counts) before `deadline` (loop time).

        Raises Overloaded at once when the queue cannot take them, NotReady after close().
        Cancelling the awaiting task abandons the job: its queued pairs never reach the model.
        With `progress`, the pairs are scored in the order given and every batch's scores land in it, so
        the caller keeps what was scored even when the job fails or is cancelled. `encodings`: the
        pairs' `Measure.encoding`s, handed to the scorer with them so it does not tokenize again.
        `first_pass`: score them with the scorer's cascade first pass (its fast engine).
        """
        if self._closed:
            raise NotReady("the sidecar is shutting down; retry on another replica")
        if self.failed.done():
            raise InternalError("the batcher stopped; retry on another replica")
        n = len(pairs)
        if n > self.max_queue_pairs:
            # Not "retry later": it would never fit (Settings refuses max_documents > max_queue_pairs).
            raise InvalidInput(
                f"{n} pairs can never fit the queue of {self.max_queue_pairs}: send at most "
                f"{self.max_queue_pairs} documents"
            )
        if self._queued_pairs + n > self.max_queue_pairs:
            raise Overloaded(
                f"queue full: {self._queued_pairs} pairs waiting, this request adds {n}, limit "
                f"{self.max_queue_pairs}; retry with backoff or add replicas"
            )
        loop = asyncio.get_running_loop()
        job = _Job(
            pairs=pairs,
            deadline=deadline,
            enqueued_at=loop.time(),
            future=loop.create_future(),
            scores=np.empty(n, dtype=np.float32),
            remaining=n,
            queued=n,
            progress=progress,
            encodings=encodings,
            first_pass=first_pass,
        )
        self._queue.extend(_Item(job, i, max(1, t)) for i, t in enumerate(tokens))
        self._queued_pairs += n
        self.metrics.queue_pairs.set(self._queued_pairs)
        self._arrived.set()
        try:
            scores = await job.future
        except asyncio.CancelledError:
            # The service gives up at the deadline itself (a partial answer): counted as the deadline's.
            self._abandon(job, "deadline" if loop.time() >= deadline else "cancelled")
            raise
        return scores, job.stats

    async def close(self) -> None:
        """Stop the loop; fail whatever is still queued with NotReady."""
        self._closed = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in self._queue:
            if not item.job.future.done():
                item.job.future.set_exception(NotReady("the sidecar shut down before this request ran"))
        self._queue.clear()
        self._queued_pairs = 0
        # A batch still in the model is not waited for: its requests were answered when the drain
        # ended, and the process exits right after. One formed to follow it never starts.
        for job in self._running:
            if not job.future.done():
                job.future.set_exception(NotReady("the sidecar shut down before this request ran"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- internals ----------------------------------------------------------------------------
    def _abandon(self, job: _Job, reason: str) -> None:
        if job.abandoned:
            return
        job.abandoned = True
        # Free its queue capacity now; the items themselves are skipped when they reach a window.
        self._queued_pairs -= job.queued
        self.metrics.pairs_dropped.labels(reason).inc(job.queued)
        job.queued = 0
        self.metrics.queue_pairs.set(self._queued_pairs)

    def _take(self, item: _Item) -> None:
        if not item.job.abandoned:
            item.job.queued -= 1
            self._queued_pairs -= 1

    async def _run(self) -> None:
        """The loop, supervised: if it ever dies, every waiting request fails with INTERNAL at once (not
        at its deadline), later ones are refused, and `failed` tells the server to report NOT_SERVING."""
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.critical("the batcher stopped on an unexpected error; reporting NOT_SERVING", exc_info=True)
            self._fail_all(InternalError("the batcher stopped; retry on another replica"))
            self.failed.set_result(exc)

    def _fail_all(self, error: Exception) -> None:
        for item in self._queue:
            if not item.job.future.done():
                item.job.future.set_exception(error)
        for job in list(self._running):
            if not job.future.done():
                job.future.set_exception(error)
        self._queue.clear()
        self._queued_pairs = 0
        self.metrics.queue_pairs.set(0)

    async def _loop(self) -> None:
        """Form a batch, hand it to the model thread, and while it runs form the next one when the queue
        already holds a full batch: the model thread goes from one batch straight to the next, never
        waiting on this loop. At most `PIPELINE_DEPTH` batches are out at once, so what arrives later
        can still join the batch after."""
        loop = asyncio.get_running_loop()
        out: deque[tuple[list[_Item], asyncio.Future[_Ran]]] = deque()
        while True:
            if len(out) < self.pipeline_depth and self._queue and (not out or self._full_batch_queued()):
                if not out:
                    await self._fill(loop)
                batch = self._next_batch(loop)
                self.metrics.queue_pairs.set(self._queued_pairs)
                if batch:
                    self._running.update(i.job for i in batch)
                    out.append((batch, loop.run_in_executor(self._executor, self._score, batch, loop)))
                continue
            if not out:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            oldest = out[0][1]
            if len(out) < self.pipeline_depth:
                # An arrival may complete a batch to form while this one runs.
                self._arrived.clear()
                arrival: asyncio.Future[Any] = asyncio.ensure_future(self._arrived.wait())
                try:
                    await asyncio.wait([oldest, arrival], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    arrival.cancel()
            else:
                await asyncio.wait({oldest})
            if oldest.done():
                batch, _ = out.popleft()
                self._finish(batch, oldest, loop)
                self._running = {i.job for b, _ in out for i in b}

    def _full_batch_queued(self) -> bool:
        """The queue holds at least a full batch of live pairs (by tokens or by pairs)."""
        tokens = pairs = 0
        for item in self._queue:
            if item.job.dead:
                continue
            tokens += item.tokens
            pairs += 1
            if tokens >= self.max_batch_tokens or pairs >= self.max_batch_pairs:
                return True
        return False

    async def _fill(self, loop: asyncio.AbstractEventLoop) -> None:
        """Under light load, wait up to max_wait for more pairs before running a partial batch."""
        if self.max_wait_s <= 0:
            return
        until = loop.time() + self.max_wait_s
        while (
            sum(i.tokens for i in self._queue) < self.max_batch_tokens and (left := until - loop.time()) > 0
        ):
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Item]:
        """The oldest request's longest pairs, topped up with other requests' pairs that add no padding.

        Requests complete in arrival order (good tail latency), each is scored in length-sorted
        batches (little padding), and a request's last partial batch is shared with the next ones.
        A batch runs one engine: it takes only pairs of the head's pass (a cascade's first pass or not).
        """
        now = loop.time()
        window: list[_Item] = []
        scanned: list[_Item] = []  # every live item taken off the queue, in queue order
        budget = self.max_batch_tokens * WINDOW_BUDGETS
        head: _Job | None = None
        while self._queue and (budget > 0 or self._queue[0].job is head):
            item = self._queue.popleft()
            job = item.job
            if job.dead:
                continue  # capacity was already returned when it was abandoned
            if now > job.deadline:
                self._expire(job)
                continue
            head = head or job
            scanned.append(item)
            budget -= item.tokens
            if job.first_pass == head.first_pass:  # the other pass's pairs go back to the queue
                window.append(item)
        if not window:
            return []
        own = [i for i in window if i.job is head]
        if head is not None and head.progress is None:
            own.sort(key=lambda i: -i.tokens)  # else in queue order: a partial answer covers the head
        batch: list[_Item] = []
        for item in own:
            if not self._fits(batch, item):
                break
            batch.append(item)
        if len(batch) == len(own):
            longest = max(i.tokens for i in batch)
            others = sorted(
                (i for i in window if i.job is not head and i.job.progress is None), key=lambda i: -i.tokens
            )
            for item in others:
                if item.tokens <= longest and self._fits(batch, item):
                    batch.append(item)
            # Jobs kept in queue order (Progress) top up only with the head of what they have queued.
            stopped: set[int] = set()
            for item in window:
                if item.job is head or item.job.progress is None or id(item.job) in stopped:
                    continue
                if item.tokens <= longest and self._fits(batch, item):
                    batch.append(item)
                else:
                    stopped.add(id(item.job))
        taken = {id(i) for i in batch}
        # Put back what was not taken, in its original (FIFO) order. The batch's pairs count as queued
        # until it reaches the model (`_begin`).
        self._queue.extendleft(reversed([i for i in scanned if id(i) not in taken]))
        return batch

    def _fits(self, batch: list[_Item], item: _Item) -> bool:
        if not batch:
            return True
        if self.padding_free:
            cost = batch_cost([*(i.tokens for i in batch), item.tokens], padding_free=True)
            return len(batch) < self.max_batch_pairs and cost <= self.max_batch_tokens
        # batch[0] is the longest unless the head job keeps queue order (Progress): then look at all.
        first = batch[0].tokens if batch[0].job.progress is None else max(i.tokens for i in batch)
        longest = max(first, item.tokens)
        return len(batch) < self.max_batch_pairs and (len(batch) + 1) * longest <= self.max_batch_tokens

    def _expire(self, job: _Job) -> None:
        waited = asyncio.get_running_loop().time() - job.enqueued_at
        done = len(job.pairs) - job.remaining
        self._abandon(job, "deadline")
        if not job.future.done():
            job.future.set_exception(
                DeadlineExceeded(
                    f"deadline passed after {waited:.3f}s in the server with {done}/{len(job.pairs)} pairs "
                    "scored; raise the client timeout, send fewer documents, or add capacity"
                )
            )

    def _score(self, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> _Ran:
        """The model thread's part: drop what died while the batch waited (a pre-formed batch waits for
        the one before it), tell the loop the rest is taken, and score it."""
        started = loop.time()
        live = [i for i in batch if not (i.job.dead or i.job.failed_in_model) and started <= i.job.deadline]
        if not live:
            return _Ran(live, np.zeros(0, dtype=np.float32), started, started)
        loop.call_soon_threadsafe(self._begin, live)
        pairs = [i.job.pairs[i.index] for i in live]
        encodings = [i.job.encodings[i.index] if i.job.encodings is not None else None for i in live]
        given = None if any(e is None for e in encodings) else encodings
        try:
            if live[0].job.first_pass:  # one pass per batch (`_next_batch`)
                scores = self.scorer.score(pairs, given, first_pass=True)
            else:
                scores = self.scorer.score(pairs, given)
        except Exception:
            for item in live:
                item.job.failed_in_model = True
            raise
        if len(scores) != len(live):
            raise ValueError(f"the scorer returned {len(scores)} scores for {len(live)} pairs")
        return _Ran(live, scores, started, loop.time())

    def _begin(self, live: list[_Item]) -> None:
        """A batch reached the model: its pairs leave the queue's count."""
        for item in live:
            self._take(item)
        self.metrics.queue_pairs.set(self._queued_pairs)

    def _finish(
        self, batch: list[_Item], done: asyncio.Future[_Ran], loop: asyncio.AbstractEventLoop
    ) -> None:
        jobs = list(dict.fromkeys(i.job for i in batch))
        try:
            ran = done.result()
        except Exception:
            log.exception("scoring a batch of %d pairs failed", len(batch))
            for job in jobs:
                # Its pairs still queued must give their capacity back, or the queue shrinks for good.
                self._abandon(job, "failed")
                if not job.future.done():
                    job.future.set_exception(InternalError("scoring failed"))
            return
        batch = ran.items
        for job in jobs:
            if not job.dead and job.deadline < ran.started:
                self._expire(job)  # its pairs were dropped before the model: the deadline had passed
        if not batch:
            return
        jobs = list(dict.fromkeys(i.job for i in batch))
        for job in jobs:
            if job.stats.batches == 0:
                job.stats.queue_seconds = ran.started - job.enqueued_at
                self.metrics.queue_seconds.observe(job.stats.queue_seconds)
        elapsed = ran.ended - ran.started
        scores = ran.scores
        self.batch_log.append((len(batch), len(jobs)))
        m = self.metrics
        m.inference_seconds.observe(elapsed)
        m.batch_pairs.observe(len(batch))
        m.batch_tokens.observe(batch_cost([i.tokens for i in batch], self.padding_free))
        m.batch_real_tokens.observe(sum(i.tokens for i in batch))
        m.batch_requests.observe(len(jobs))
        m.pairs_scored.inc(len(batch))
        for job in jobs:
            job.stats.inference_seconds += elapsed
            job.stats.batches += 1
        for item, score in zip(batch, scores, strict=True):
            job = item.job
            job.scores[item.index] = score
            if job.progress is not None:
                job.progress.scores[item.index] = score
                job.progress.done[item.index] = True
            job.remaining -= 1
            if job.remaining == 0 and not job.future.done():
                job.future.set_result(job.scores)
