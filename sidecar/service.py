"""The rerank service: validate -> job -> batcher -> fuse, sort, top_n. Shared by every front end.

Front ends (gRPC, HTTP) translate their wire format to `RerankQuery`, call `rerank`, and translate the
`RerankResult` or `RerankError` back. Readiness lives here so gRPC health and HTTP /health agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from sidecar import __version__
from sidecar.batcher import Batcher, BatchStats, Progress
from sidecar.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    NotReady,
    Overloaded,
    RerankError,
    outcome_label,
)
from sidecar.fusion import (
    NO_FUSION,
    FusionSpec,
    check_inputs,
    configured_default,
    first_missing,
    fuse,
)
from sidecar.metrics import Metrics
from sidecar.score_cache import CachedScore, Entry, ScoreCache, WindowedScore
from sidecar.scoring.base import Measure, Pair, Scorer
from sidecar.settings import Settings
from sidecar.threads import tokenize_workers, usable_cores
from sidecar.types import (
    HitStatus,
    ModelInfo,
    RankedHit,
    RerankQuery,
    RerankResult,
    ServiceInfo,
    Timings,
)
from sidecar.windows import WindowPolicy, Windows, aggregate, split

log = logging.getLogger(__name__)
T = TypeVar("T")

# Pairs tokenized per step. Documents are clipped to what the model reads, so a slice costs at most
# about MEASURE_SLICE_PAIRS x max_length x 8 characters of tokenizer work (tens of milliseconds).
MEASURE_SLICE_PAIRS = 32
WARMUP_QUERY = "what does a reranker do"
WARMUP_DOCS = (
    "A reranker scores each candidate document against the query and reorders the candidates.",
    "Bananas are rich in potassium.",
)


class RerankService:
    def __init__(self, settings: Settings, metrics: Metrics, scorer: Scorer | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.scorer = scorer
        self.batcher: Batcher | None = None
        self._loaded = False
        self._draining = False
        # Tokenising (measuring) runs beside inference so a big request never blocks the event loop; it
        # leaves the cores to the model (sidecar/threads.py).
        self._prep = ThreadPoolExecutor(
            max_workers=tokenize_workers(usable_cores()), thread_name_prefix="tokenize"
        )
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._aborted_future: asyncio.Future[None] | None = None
        # Resolved by `start` (it may read the model directory's fusion.json).
        self.default_fusion: FusionSpec | None = None
        self._told_blend_skipped = False
        # Shared by every front end; None when settings.score_cache_bytes is 0.
        self.score_cache = (
            ScoreCache(settings.score_cache_bytes, metrics) if settings.score_cache_bytes else None
        )

    # ---- lifecycle ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._loaded and not self._draining and not self.broken

    @property
    def broken(self) -> bool:
        """The batcher died on an unexpected error: nothing can be scored until a restart."""
        return self.batcher is not None and self.batcher.failed.done()

    async def start(self) -> None:
        """Load the model (in a thread), start the batcher, run the warm-up batch, then report ready."""
        loop = asyncio.get_running_loop()
        # Before the model loads, so a malformed fusion.json fails the start at once.
        self.default_fusion = self._resolve_default_fusion()
        if self.scorer is None:
            from sidecar.scoring.loading import load_scorer

            # Its own thread, not the loop's default executor: asyncio.run joins that one on exit, so a
            # SIGTERM during loading would wait for the load to finish.
            loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-model")
            try:
                self.scorer = await loop.run_in_executor(loader, load_scorer, self.settings)
            finally:
                loader.shutdown(wait=False)
        s = self.settings
        self.batcher = Batcher(
            self.scorer,
            self.metrics,
            max_batch_tokens=s.max_batch_tokens,
            max_batch_pairs=s.max_batch_pairs,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue_pairs=s.max_queue_pairs,
        )
        self.batcher.start()
        info = self.scorer.info
        self.metrics.model_info.labels(
            info.model_id, info.revision, info.backend, info.device, info.dtype
        ).set(1)
        self.metrics.runtime_info.labels(info.runtime, info.dtype).set(1)
        if info.cascade:
            self.metrics.cascade_info.labels(info.cascade, str(info.cascade_depth)).set(1)
        if s.warmup:
            pairs = [Pair(WARMUP_QUERY, d) for d in WARMUP_DOCS]
            measures = self.scorer.measure(pairs)
            await self.batcher.submit(
                pairs, [m.tokens for m in measures], loop.time() + 600, None, [m.encoding for m in measures]
            )
        self._loaded = True
        self.metrics.ready.set(1)
        log.info(
            "serving %s (%s on %s, runtime %s, %s%s)",
            info.model_id,
            info.backend,
            info.device,
            info.runtime,
            info.dtype,
            f"; cascade: {info.cascade} first, top {info.cascade_depth} re-scored" if info.cascade else "",
        )

    def _resolve_default_fusion(self) -> FusionSpec:
        from sidecar.scoring.loading import local_model_dir

        spec, source = configured_default(self.settings, local_model_dir(self.settings.model))
        log.info("default score fusion: %s (%s)", spec.describe(), source)
        return spec

    def begin_drain(self) -> None:
        """Stop taking new work; in-flight requests continue."""
        self._draining = True
        self.metrics.ready.set(0)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (True) or `timeout` passes (False)."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self.batcher:
            await self.batcher.close()
        self._prep.shutdown(wait=False)

    def info(self) -> ServiceInfo:
        """The served model and this server's limits: what gRPC `Info` and HTTP `/v1/info` report."""
        if self.scorer is None or self.default_fusion is None:
            raise NotReady("the model is still loading")
        model: ModelInfo = self.scorer.info
        s = self.settings
        return ServiceInfo(
            model_id=model.model_id,
            model_revision=model.revision,
            backend=model.backend,
            device=model.device,
            dtype=model.dtype,
            attention=model.attention,
            max_length=model.max_length,
            max_batch_tokens=s.max_batch_tokens,
            max_batch_pairs=s.max_batch_pairs,
            max_documents=s.max_documents,
            max_queue_pairs=s.max_queue_pairs,
            max_body_bytes=s.max_body_bytes,
            accepts_instruction=model.accepts_instruction,
            server_version=__version__,
            default_fusion=self.default_fusion,
            ready=self.ready,
            runtime=model.runtime,
            cascade=model.cascade,
            cascade_depth=model.cascade_depth,
        )

    @contextlib.contextmanager
    def counting_refusals(self, api: str) -> Iterator[None]:
        """Around a front end's reading and translating of a request: a refusal there never reaches
        `rerank`, which counts every request it sees, so it is counted here, once, and re-raised for the
        front end's one error path to answer."""
        try:
            yield
        except RerankError as exc:
            self.metrics.requests.labels(api, outcome_label(exc)).inc()
            raise

    # ---- requests -----------------------------------------------------------------------------
    async def rerank(self, query: RerankQuery, api: str) -> RerankResult:
        started = time.perf_counter()
        error: BaseException | None = None
        self._count(+1)
        fell_back = False
        try:
            try:
                return await self._unless_aborted(self._rerank(query, started))
            except (RerankError, asyncio.CancelledError):
                raise
            except Exception as exc:
                log.exception("unexpected error while reranking")
                raise InternalError("unexpected error") from exc
        except RerankError as exc:
            fallback = self._fail_open(query, exc, started)
            if fallback is None:
                error = exc
                raise
            fell_back = True
            return fallback
        except asyncio.CancelledError as exc:
            error = exc
            raise
        finally:
            self._count(-1)
            outcome = "cancelled" if isinstance(error, asyncio.CancelledError) else outcome_label(error)
            outcome = "fallback" if fell_back else outcome
            self.metrics.requests.labels(api, outcome).inc()
            self.metrics.request_seconds.labels(api).observe(time.perf_counter() - started)

    async def receive(self, arriving: Coroutine[Any, Any, T]) -> T:
        """A front end's request still arriving (an HTTP body being read): counted in flight so the
        drain waits for it, answered NotReady if the drain ends first, refused at once while draining."""
        if self._draining:
            arriving.close()
            raise NotReady("the sidecar is shutting down; retry on another replica")
        self._count(+1)
        try:
            return await self._unless_aborted(arriving)
        finally:
            self._count(-1)

    def _count(self, delta: int) -> None:
        self.in_flight += delta
        if self.in_flight == 0:
            self._idle.set()
        else:
            self._idle.clear()

    async def _unless_aborted(self, work: Coroutine[Any, Any, T]) -> T:
        """`work`'s result, or NotReady as soon as the drain is over (`abort_in_flight`): every request
        accepted gets an answer, even one still being tokenized or scored when the drain ends."""
        task = asyncio.ensure_future(work)
        either: set[asyncio.Future[Any]] = {task, self._aborted}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()  # the client went away: its pairs leave the queue
            raise
        if not task.done():
            task.cancel()
            raise NotReady("the sidecar shut down before this request finished; retry on another replica")
        return task.result()

    @property
    def _aborted(self) -> asyncio.Future[None]:
        if self._aborted_future is None:  # created on the server's loop, at first use
            self._aborted_future = asyncio.get_running_loop().create_future()
        return self._aborted_future

    def abort_in_flight(self) -> None:
        """End of the drain: whatever is still running is answered NotReady now."""
        if not self._aborted.done():
            self._aborted.set_result(None)

    async def _rerank(self, q: RerankQuery, started: float) -> RerankResult:
        if not self.ready or self.scorer is None or self.batcher is None:
            if self.broken:
                raise NotReady("this replica stopped scoring after an internal error and needs a restart")
            raise NotReady("the sidecar is shutting down" if self._draining else "the model is still loading")
        self._validate(q, self.scorer)
        depth = self.scorer.cascade_depth
        if not depth:
            return await self._rerank_pass(q, started)
        if len(q.documents) <= depth:
            self.metrics.cascade_requests.labels("direct").inc()
            return await self._rerank_pass(q, started)
        return await self._cascade(q, started, depth)

    # ---- cascade (settings.cascade, docs/runtimes.md) ---------------------------------------------
    async def _cascade(self, q: RerankQuery, started: float, depth: int) -> RerankResult:
        """Every document through the fast first pass, then the `depth` it ranks highest (fused, as they
        would be served) re-scored at the served precision; the ranking is then fused and sorted again.

        Each pass has its own score-cache entries, and the second re-uses the first's encodings. If the
        deadline comes during the second pass, a request that allows partial results gets the first pass's
        complete ranking (never a mix of half-done passes); one that does not gets DEADLINE_EXCEEDED.
        """
        loop = asyncio.get_running_loop()
        deadline = q.deadline if q.deadline is not None else loop.time() + self.settings.default_timeout_s
        measured: dict[int, Measure] = {}
        first = await self._rerank_pass(
            dataclasses.replace(q, top_n=None, deadline=deadline),
            started,
            first_pass=True,
            measures_out=measured,
        )
        top_n = min(q.top_n or len(first.hits), len(first.hits))
        if any(h.status is not HitStatus.RERANKED for h in first.hits):
            return dataclasses.replace(first, hits=first.hits[:top_n])  # a partial answer, as it stands
        top = [h.index for h in first.hits[:depth]]
        partial = self.settings.partial_results if q.partial_results is None else q.partial_results
        # The re-score is whole or not at all; with partial results it must end in time for the first
        # pass's answer to reach the client.
        margin = self.settings.partial_results_margin_ms / 1000 if partial else 0.0
        sub = dataclasses.replace(
            q,
            documents=[q.documents[i] for i in top],
            top_n=None,
            fusion=NO_FUSION,
            partial_results=False,
            deadline=deadline - margin,
        )
        try:
            second = await self._rerank_pass(
                sub, started, measures_in={j: measured[i] for j, i in enumerate(top) if i in measured}
            )
        except DeadlineExceeded:
            if not partial:
                raise
            log.info("cascade: the deadline came during the re-score; answering with the first pass")
            self.metrics.cascade_requests.labels("first_pass_only").inc()
            return dataclasses.replace(first, hits=first.hits[:top_n])
        self.metrics.cascade_requests.labels("rescored").inc()
        hits = {h.index: h for h in first.hits}
        for h in second.hits:
            hits[top[h.index]] = dataclasses.replace(h, index=top[h.index])
        merged = [hits[i] for i in range(len(q.documents))]
        fused = fuse(first.fusion, [h.score for h in merged], [d.first_stage_score for d in q.documents])
        order = sorted(range(len(merged)), key=lambda i: -fused[i])  # stable: ties keep input order
        a, b = first.timings, second.timings
        return dataclasses.replace(
            first,
            hits=[dataclasses.replace(merged[i], fused_score=fused[i]) for i in order[:top_n]],
            timings=Timings(
                queue_seconds=a.queue_seconds + b.queue_seconds,
                inference_seconds=a.inference_seconds + b.inference_seconds,
                total_seconds=time.perf_counter() - started,
                batches=a.batches + b.batches,
            ),
            cached_pairs=first.cached_pairs + second.cached_pairs,
        )

    async def _rerank_pass(
        self,
        q: RerankQuery,
        started: float,
        *,
        first_pass: bool = False,
        measures_in: dict[int, Measure] | None = None,
        measures_out: dict[int, Measure] | None = None,
    ) -> RerankResult:
        """Score `q`'s documents once (through the cascade's first pass when `first_pass`), fuse, sort.

        `measures_in`: measures already made for some documents (by index), not made again;
        `measures_out` receives those this pass made.
        """
        assert self.scorer is not None and self.batcher is not None
        fusion = self._fusion_for(q)
        loop = asyncio.get_running_loop()
        deadline = q.deadline if q.deadline is not None else loop.time() + self.settings.default_timeout_s
        pairs = [Pair(q.query, d.model_text(), q.instruction or None) for d in q.documents]
        partial = self.settings.partial_results if q.partial_results is None else q.partial_results
        # Score cache: pairs it knows never reach the tokenizer or the batcher; only the rest go on.
        cache_keys, known = self._cache_lookup(q, pairs, first_pass)
        # A request that may be answered partially is queued (and scored) in first-stage order.
        queue_order = first_stage_order(q) if partial else range(len(pairs))
        todo = [i for i in queue_order if known[i] is None]
        all_pairs, pairs = pairs, [pairs[i] for i in todo]

        progress = Progress.of(len(pairs)) if partial and pairs else None
        if progress is not None:
            # With partial results the answer is built partial_results_margin_ms before the deadline,
            # whatever is under way then (tokenizing included).
            deadline -= self.settings.partial_results_margin_ms / 1000
        t0 = time.perf_counter()
        given = measures_in or {}
        measuring = self._measure_missing(pairs, [given.get(i) for i in todo])
        if progress is None:
            measures = await measuring
        else:
            try:
                measures = await asyncio.wait_for(measuring, max(0.0, deadline - loop.time()))
            except TimeoutError:
                return self._partial_answer(q, fusion, known, started, len(all_pairs) - len(todo))
        if measures_out is not None:
            measures_out.update(zip(todo, measures, strict=True))
        # Long documents: a truncated pair becomes its windows, each its own pair in the batcher.
        windows = await self._windows(q, pairs, measures, self.scorer)
        if windows is not None:
            pairs, measures, owners = await self._window_pairs(pairs, measures, windows, self.scorer)
            # A partial answer is per document, and a split document is scored only with all its windows:
            # a request whose documents were split is answered whole or fails at its deadline.
            progress = None
        self.metrics.tokenize_seconds.observe(time.perf_counter() - t0)
        # From here on only what the model can read is held per pair (Measure.clipped).
        pairs = [m.clipped or p for p, m in zip(pairs, measures, strict=True)]

        remaining = deadline - loop.time()
        fresh, stats = np.zeros(0, dtype=np.float32), BatchStats()
        if pairs and remaining <= 0 and progress is None:
            raise DeadlineExceeded(
                "the deadline passed before the request was queued; raise the client timeout"
            )
        try:
            if pairs and remaining > 0:
                fresh, stats = await asyncio.wait_for(
                    self.batcher.submit(
                        pairs,
                        [m.tokens for m in measures],
                        deadline,
                        progress,
                        [m.encoding for m in measures],
                        first_pass,
                    ),
                    remaining,
                )
            elif progress is not None:
                raise TimeoutError
        except (TimeoutError, DeadlineExceeded) as exc:
            if progress is None:
                if isinstance(exc, DeadlineExceeded):
                    raise
                raise DeadlineExceeded(
                    f"deadline passed after {time.perf_counter() - started:.3f}s before all {len(pairs)} "
                    "pairs were scored; raise the client timeout, send fewer documents, or add capacity"
                ) from exc
            # Partial results: keep what the model scored, the rest falls back below it.
            known = self._cache_merge_partial(cache_keys, known, todo, progress, measures)
            return self._partial_answer(q, fusion, known, started, len(all_pairs) - len(todo))
        if windows is None:
            entries: list[Entry] = [
                CachedScore(float(f), m.truncated) for f, m in zip(fresh, measures, strict=True)
            ]
        else:
            entries = self._fold_windows(q, todo, windows, owners, fresh, measures)
        # Documents whose text the model did not read to the end (a split document: past its last window).
        truncated = sum(e.truncated for e in entries)
        if truncated:
            self.metrics.truncated.inc(truncated)
        scores, scored = self._cache_merge(cache_keys, known, todo, entries)
        pairs = all_pairs

        fused = fuse(fusion, scores, [d.first_stage_score for d in q.documents])
        # Stable sort: equal scores keep first-stage (input) order.
        order = sorted(range(len(pairs)), key=lambda i: -fused[i])
        # One rule for every front end (Cohere's): 0 or unset means all, more than there are means all.
        top_n = min(q.top_n or len(order), len(order))
        hits = [
            RankedHit(
                index=i,
                id=q.documents[i].id,
                score=float(scores[i]),
                first_stage_score=q.documents[i].first_stage_score,
                status=HitStatus.RERANKED,
                truncated=scored[i].truncated,
                fused_score=fused[i],
                **passage_fields(scored[i]),
            )
            for i in order[:top_n]
        ]
        self.metrics.fusion_requests.labels(fusion.method.value).inc()
        info = self.scorer.info
        timings = Timings(
            queue_seconds=stats.queue_seconds,
            inference_seconds=stats.inference_seconds,
            total_seconds=time.perf_counter() - started,
            batches=stats.batches,
        )
        return RerankResult(
            hits=hits,
            model_id=info.model_id,
            model_revision=info.revision,
            timings=timings,
            fusion=fusion,
            cached_pairs=len(all_pairs) - len(todo),
        )

    # ---- fail-open (issue 15 item 2) --------------------------------------------------------------
    def _fail_open(self, q: RerankQuery, error: RerankError, started: float) -> RerankResult | None:
        """The fail-open answer to `q` instead of `error`, or None where `error` stands: the request did
        not opt in (nor the server by default), the error is not one of not being able to score (bad
        input, a cancelled call), or the input is invalid (refused as today, never papered over)."""
        reason = fallback_reason(error)
        if reason is None or not (self.settings.fail_open if q.fail_open is None else q.fail_open):
            return None
        try:
            self._validate(q, self.scorer)
        except InvalidInput:
            return None
        self.metrics.fallbacks.labels(reason).inc()
        log.warning(
            "fail-open: answered %d documents in first-stage order (%s: %s)",
            len(q.documents),
            reason,
            error.message,
        )
        order = first_stage_order(q)
        n = len(order)
        top_n = min(q.top_n or n, n)
        hits = [
            RankedHit(
                index=i,
                id=q.documents[i].id,
                score=0.0,  # no model score; `status` says so
                first_stage_score=q.documents[i].first_stage_score,
                status=HitStatus.FALLBACK,
                fallback_reason=reason,
                fused_score=float(n - position),  # descending: ranking by it keeps first-stage order
            )
            for position, i in enumerate(order[:top_n])
        ]
        info = self.scorer.info if self.scorer is not None else None
        return RerankResult(
            hits=hits,
            model_id=info.model_id if info else "",
            model_revision=info.revision if info else "",
            timings=Timings(total_seconds=time.perf_counter() - started),
            fusion=NO_FUSION,
        )

    # ---- partial results (issue 15 item 1) -------------------------------------------------------
    def _partial_answer(
        self,
        q: RerankQuery,
        fusion: FusionSpec,
        known: list[Entry | None],
        started: float,
        cached_pairs: int,
    ) -> RerankResult:
        """The answer at the deadline: the scored hits (cached or fresh) ranked as usual, then the
        unscored ones in first-stage order, FALLBACK "deadline", their ranking scores below every scored
        hit's (lowest - 1, lowest - 2, ...; n, n-1, ... when none was scored) so that anything sorting by
        the ranking score, OpenSearch included, keeps that order."""
        scored = [i for i, c in enumerate(known) if c is not None]
        rest = [i for i in first_stage_order(q) if known[i] is None]
        raw = [known[i].score for i in scored]  # type: ignore[union-attr]
        fused = fuse(fusion, raw, [q.documents[i].first_stage_score for i in scored]) if scored else []
        ranked = sorted(range(len(scored)), key=lambda j: -fused[j])
        lowest = min(fused) if fused else float(len(q.documents) + 1)
        hits = [
            RankedHit(
                index=scored[j],
                id=q.documents[scored[j]].id,
                score=raw[j],
                first_stage_score=q.documents[scored[j]].first_stage_score,
                status=HitStatus.RERANKED,
                truncated=known[scored[j]].truncated,  # type: ignore[union-attr]
                fused_score=fused[j],
            )
            for j in ranked
        ] + [
            RankedHit(
                index=i,
                id=q.documents[i].id,
                score=0.0,  # no model score; `status` says so
                first_stage_score=q.documents[i].first_stage_score,
                status=HitStatus.FALLBACK,
                fallback_reason="deadline",
                fused_score=lowest - 1.0 - position,
            )
            for position, i in enumerate(rest)
        ]
        top_n = min(q.top_n or len(hits), len(hits))
        self.metrics.partial_answers.inc()
        self.metrics.partial_fallback_hits.inc(len(rest))
        if rest:
            self.metrics.fallbacks.labels("deadline").inc()
        self.metrics.fusion_requests.labels(fusion.method.value).inc()
        log.info("partial answer at the deadline: %d of %d pairs scored", len(scored), len(known))
        assert self.scorer is not None
        info = self.scorer.info
        return RerankResult(
            hits=hits[:top_n],
            model_id=info.model_id,
            model_revision=info.revision,
            timings=Timings(total_seconds=time.perf_counter() - started),
            fusion=fusion,
            cached_pairs=cached_pairs,
        )

    def _cache_merge_partial(
        self,
        keys: list[bytes],
        known: list[Entry | None],
        todo: list[int],
        progress: Progress,
        measures: list[Measure],
    ) -> list[Entry | None]:
        """`known` with the pairs the model scored before the deadline added (and cached when keyed);
        None stays where no score came."""
        merged: list[Entry | None] = list(known)
        done = [(j, i) for j, i in enumerate(todo) if progress.done[j]]
        for j, i in done:
            merged[i] = CachedScore(float(progress.scores[j]), measures[j].truncated)
        if keys and self.score_cache is not None and done:
            self.score_cache.put_many([(keys[i], merged[i]) for _, i in done])  # type: ignore[misc]
        return merged

    # ---- score cache (sidecar/score_cache.py) --------------------------------------------------
    def _cache_lookup(
        self, q: RerankQuery, pairs: list[Pair], first_pass: bool = False
    ) -> tuple[list[bytes], list[Entry | None]]:
        """Keys and cached scores of `pairs`; no keys and nothing known when off or bypassed. A cascade's
        first pass has keys of its own: its scores never stand in for the served precision's."""
        if self.score_cache is None or q.bypass_cache:
            return [], [None] * len(pairs)
        assert self.scorer is not None
        info = self.scorer.info
        policy = self._window_policy(q)
        keys = ScoreCache.keys(
            info,
            q.instruction,
            q.query,
            [p.document for p in pairs],
            info.max_length,
            (policy.cache_tag() if policy else "truncate")
            + (f"|first pass {info.cascade}" if first_pass else ""),
        )
        return keys, self.score_cache.get_many(keys)

    def _cache_merge(
        self,
        keys: list[bytes],
        known: list[Entry | None],
        todo: list[int],
        fresh: list[Entry],
    ) -> tuple[list[float], list[Entry]]:
        """Every pair's score and truncation, cached and fresh together; fresh ones stored when keyed."""
        merged = list(known)
        for j, i in enumerate(todo):
            merged[i] = fresh[j]
        if keys and self.score_cache is not None and todo:
            self.score_cache.put_many([(keys[i], merged[i]) for i in todo])  # type: ignore[misc]
        done = [c for c in merged if c is not None]
        assert len(done) == len(merged)
        return [c.score for c in done], done

    # ---- long documents (sidecar/windows.py) ----------------------------------------------------
    def _window_policy(self, q: RerankQuery) -> WindowPolicy | None:
        """The request's windowing, or None when long documents are truncated."""
        s = self.settings
        if s.long_documents != "windows":
            return None
        cap = s.max_windows_per_document
        return WindowPolicy(s.window_overlap_tokens, min(q.max_windows or cap, cap), s.window_aggregate)

    async def _windows(
        self, q: RerankQuery, pairs: list[Pair], measures: list[Measure], scorer: Scorer
    ) -> list[Windows | None] | None:
        """Per pair its windows (None: scored as measured); None for all when windowing is off."""
        policy = self._window_policy(q)
        if policy is None:
            return None
        long = [i for i, m in enumerate(measures) if m.truncated]
        found: list[Windows | None] = [None] * len(pairs)
        loop = asyncio.get_running_loop()
        for start in range(0, len(long), MEASURE_SLICE_PAIRS):
            chunk = long[start : start + MEASURE_SLICE_PAIRS]
            split_ = await loop.run_in_executor(self._prep, split, scorer, [pairs[i] for i in chunk], policy)
            for i, w in zip(chunk, split_, strict=True):
                found[i] = w
        return found

    async def _window_pairs(
        self, pairs: list[Pair], measures: list[Measure], windows: list[Windows | None], scorer: Scorer
    ) -> tuple[list[Pair], list[Measure], list[int]]:
        """The pairs to score: each windowed pair replaced by one pair per window; and per scored pair the
        index of the pair it came from."""
        out: list[Pair] = []
        out_measures: list[Measure | None] = []
        owners: list[int] = []
        for i, (p, m, w) in enumerate(zip(pairs, measures, windows, strict=True)):
            if w is None:
                out.append(p)
                out_measures.append(m)
                owners.append(i)
                continue
            for a, b in w.spans:
                out.append(p._replace(document=p.document[a:b]))
                out_measures.append(None)
                owners.append(i)
        new = [j for j, m in enumerate(out_measures) if m is None]
        measured = await self._measure([out[j] for j in new], scorer)
        for j, m in zip(new, measured, strict=True):
            out_measures[j] = m
        return out, [m for m in out_measures if m is not None], owners

    def _fold_windows(
        self,
        q: RerankQuery,
        todo: list[int],
        windows: list[Windows | None],
        owners: list[int],
        fresh: np.ndarray,
        measures: list[Measure],
    ) -> list[Entry]:
        """One entry per pair from its windows' scores (settings.window_aggregate)."""
        policy = self._window_policy(q)
        assert policy is not None
        rows: list[list[int]] = [[] for _ in windows]
        for j, owner in enumerate(owners):
            rows[owner].append(j)
        entries: list[Entry] = []
        for k, (w, js) in enumerate(zip(windows, rows, strict=True)):
            if w is None:
                (j,) = js
                entries.append(CachedScore(float(fresh[j]), measures[j].truncated))
                continue
            score, best = aggregate([float(fresh[j]) for j in js], policy.aggregate)
            a, b = w.spans[best]
            # Offsets into `text`: the model read 'title text'.
            title = q.documents[todo[k]].title
            skip = len(title) + 1 if title else 0
            entries.append(WindowedScore(score, w.cut, max(0, a - skip), max(0, b - skip), len(js)))
            self.metrics.windows.inc(len(js))
        return entries

    async def _measure_missing(self, pairs: list[Pair], given: list[Measure | None]) -> list[Measure]:
        """`given`'s measures, the missing ones made (`_measure`)."""
        assert self.scorer is not None
        missing = [j for j, m in enumerate(given) if m is None]
        if len(missing) == len(given):
            return await self._measure(pairs, self.scorer)
        made = iter(await self._measure([pairs[j] for j in missing], self.scorer))
        return [m if m is not None else next(made) for m in given]

    async def _measure(self, pairs: list[Pair], scorer: Scorer) -> list[Measure]:
        """Tokenize in slices of MEASURE_SLICE_PAIRS: each slice is its own job on the tokenize threads,
        so a big request's slices queue behind a small request's instead of holding it up."""
        loop = asyncio.get_running_loop()
        measures: list[Measure] = []
        for start in range(0, len(pairs), MEASURE_SLICE_PAIRS):
            chunk = pairs[start : start + MEASURE_SLICE_PAIRS]
            measures += await loop.run_in_executor(self._prep, scorer.measure, chunk)
        return measures

    def _fusion_for(self, q: RerankQuery) -> FusionSpec:
        """The request's fusion, else the server default; a default blend without scores becomes none."""
        first_stage = [d.first_stage_score for d in q.documents]
        if q.fusion is not None:
            check_inputs(q.fusion, first_stage)  # asked for explicitly: refuse what cannot apply
            return q.fusion
        assert self.default_fusion is not None
        spec = self.default_fusion
        missing = first_missing(first_stage)
        if spec.method.needs_first_stage_scores and missing is not None:
            # OpenSearch's rerank processor sends text only; refusing would break every search.
            self.metrics.fusion_skipped.labels("no_first_stage_score").inc()
            if not self._told_blend_skipped:
                self._told_blend_skipped = True
                log.warning(
                    "default fusion %s skipped: documents[%d] has no first_stage_score, so the request is "
                    "ranked by the reranker alone (counted in reranker_fusion_skipped_total; logged once)",
                    spec.describe(),
                    missing,
                )
            return NO_FUSION
        return spec

    def _validate(self, q: RerankQuery, scorer: Scorer | None) -> None:
        s = self.settings
        if not q.query or not q.query.strip():
            raise InvalidInput("query is empty: send the search text in `query`")
        if len(q.query) > s.max_query_chars:
            raise InvalidInput(
                f"query has {len(q.query)} characters, more than the limit of {s.max_query_chars}: shorten it"
            )
        n = len(q.documents)
        if n == 0:
            raise InvalidInput("no documents to rerank: send at least one in `documents`")
        if n > s.max_documents:
            raise InvalidInput(
                f"{n} documents exceed this server's limit of {s.max_documents} per request: send at most "
                f"{s.max_documents} (the operator can raise RERANK_MAX_DOCUMENTS)"
            )
        if q.top_n is not None and q.top_n < 0:
            raise InvalidInput(f"top_n={q.top_n} is negative: use 1..{n}, or 0 for all")
        if q.instruction and scorer is not None and not scorer.accepts_instruction:
            raise InvalidInput(
                f"model {scorer.info.model_id} takes no instruction: remove `instruction` from the request"
            )
        for i, d in enumerate(q.documents):
            if d.first_stage_score is not None and not math.isfinite(d.first_stage_score):
                raise InvalidInput(f"documents[{i}].first_stage_score is not a finite number")


def passage_fields(entry: Entry) -> dict[str, Any]:
    """A hit's long-document fields: the winning window when the document was split."""
    if isinstance(entry, WindowedScore):
        return {
            "passage_start": entry.passage_start,
            "passage_end": entry.passage_end,
            "windows": entry.windows,
        }
    return {}


# Why a fail-open answer fell back, by the error it replaces; errors absent here are never failed open.
_FALLBACK_REASONS: tuple[tuple[type[RerankError], str], ...] = (
    (Overloaded, "overloaded"),
    (InternalError, "model_error"),
    (NotReady, "unavailable"),
    (DeadlineExceeded, "deadline"),
)


def fallback_reason(error: RerankError) -> str | None:
    return next((reason for cls, reason in _FALLBACK_REASONS if isinstance(error, cls)), None)


def first_stage_order(q: RerankQuery) -> list[int]:
    """Document indices in first-stage order: by `first_stage_score` (descending, ties in input order)
    when every document has one, else the input order (taken to be the first stage's)."""
    scores = [d.first_stage_score for d in q.documents]
    if any(s is None for s in scores):
        return list(range(len(scores)))
    return sorted(range(len(scores)), key=lambda i: -(scores[i] or 0.0))
