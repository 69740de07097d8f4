"""The replay: every query through first stage then rerank stage, closed-loop or at a fixed arrival rate.

Closed loop (`concurrency` workers, no `qps`): each worker sends its next query as soon as the previous one is
answered, which measures capacity. Open loop (`qps`): query i is due at start + i/qps whatever happened
before, and its end-to-end latency is counted from that due time, so a backlog shows up as latency instead
of silently lowering the offered load (the "coordinated omission" trap).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.progress import Progress

from sidecar.eval.datasets import Dataset
from sidecar.eval.first_stage import FirstStage, Hit, advance, progress_task
from sidecar.eval.metrics import Run, order_scores
from sidecar.eval.rerankers import Candidate, Reranker, RerankError, RerankOutput


@dataclass(frozen=True)
class ReplayConfig:
    hits: int = 1000
    depth: int = 100
    concurrency: int = 1
    qps: float | None = None
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.hits < 1:
            raise ValueError("hits must be at least 1")
        if self.depth < 0:
            raise ValueError("depth must be 0 or more")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.qps is not None and self.qps <= 0:
            raise ValueError("qps must be positive")


@dataclass
class QueryRecord:
    qid: str
    first_stage: list[Hit]
    first_stage_seconds: float
    e2e_seconds: float
    candidates: list[str] = field(default_factory=list)
    rerank: RerankOutput | None = None
    rerank_seconds: float | None = None
    error: str | None = None
    # Open loop only: how long after its due time the query actually started (client-side backlog).
    start_lag_seconds: float = 0.0


@dataclass
class ReplayResult:
    qids: list[str]
    records: dict[str, QueryRecord]
    wall_seconds: float
    config: ReplayConfig
    reranked: bool

    @property
    def pairs(self) -> int:
        return sum(len(r.candidates) for r in self.records.values() if r.rerank is not None)

    @property
    def rerank_errors(self) -> dict[str, str]:
        return {q: r.error for q, r in self.records.items() if r.error}

    def first_stage_run(self) -> Run:
        return {q: [(h.doc_id, h.score) for h in r.first_stage] for q, r in self.records.items()}

    def reranked_run(self, unfused: bool = False) -> tuple[Run, int]:
        """The pipeline's final ranking per query, and how many scores had to be nudged to make it strict.

        Reranked candidates come first in the sidecar's order with its scores; the first-stage hits beyond
        `depth` follow in first-stage order, scored just below the last reranked hit (their own scores are on
        another scale). A query whose rerank call failed keeps its first-stage ranking: that is what a
        fail-open search would have shown the user.

        `unfused` ranks the head by the model's raw score instead of the fused one, for the queries the
        sidecar fused (the others are the same either way): reranking without fusion, from the same replay.
        """
        run: Run = {}
        nudged = 0
        for q, r in self.records.items():
            if r.rerank is None:
                run[q] = [(h.doc_id, h.score) for h in r.first_stage]
                continue
            ranking = r.rerank.unfused_ranking if unfused else None
            head = list(ranking if ranking is not None else r.rerank.ranking)
            seen = {d for d, _ in head}
            floor = min((s for _, s in head), default=0.0)
            missing = [d for d in r.candidates if d not in seen]  # candidates the sidecar did not return
            rest = missing + [
                h.doc_id for h in r.first_stage if h.doc_id not in seen and h.doc_id not in missing
            ]
            tail = [(d, floor - (i + 1)) for i, d in enumerate(rest)]
            ranking, changed = order_scores(head + tail)
            run[q] = ranking
            nudged += changed
        return run, nudged


def _candidates(dataset: Dataset, hits: Sequence[Hit], depth: int) -> list[Candidate]:
    # A search index may hold documents the local corpus lacks; they cannot be sent and are left in place.
    return [(h.doc_id, dataset.corpus[h.doc_id], h.score) for h in hits[:depth] if h.doc_id in dataset.corpus]


def run_query(
    dataset: Dataset,
    qid: str,
    first_stage: FirstStage,
    reranker: Reranker | None,
    config: ReplayConfig,
    due: float | None = None,
) -> QueryRecord:
    query = dataset.queries[qid]
    started = time.perf_counter()
    origin = due if due is not None else started
    hits = first_stage.search(query, config.hits)
    fs_seconds = time.perf_counter() - started
    record = QueryRecord(qid, hits, fs_seconds, 0.0, start_lag_seconds=max(0.0, started - origin))
    if reranker is not None and config.depth > 0 and hits:
        candidates = _candidates(dataset, hits, config.depth)
        record.candidates = [c[0] for c in candidates]
        t0 = time.perf_counter()
        try:
            record.rerank = reranker.rerank(query, candidates)
        except RerankError as exc:
            record.error = str(exc)
        record.rerank_seconds = time.perf_counter() - t0
    record.e2e_seconds = time.perf_counter() - origin
    return record


def replay(
    dataset: Dataset,
    qids: Sequence[str],
    first_stage: FirstStage,
    reranker: Reranker | None,
    config: ReplayConfig,
    progress: Progress | None = None,
) -> ReplayResult:
    qids = list(qids)
    if config.warmup:
        # Warm-up queries prime the JVM's JIT, the sidecar's first batches and connection set-up; their
        # results are discarded. They run on a worker thread like the real ones (thread attachment included).
        _run_workers(dataset, qids[: config.warmup], first_stage, reranker, config, None, None, workers=1)
    task = progress_task(progress, f"replaying {len(qids)} queries", len(qids))
    started = time.perf_counter()
    records = _run_workers(dataset, qids, first_stage, reranker, config, progress, task, config.concurrency)
    wall = time.perf_counter() - started
    return ReplayResult(qids, {q: records[i] for i, q in enumerate(qids)}, wall, config, reranker is not None)


def _run_workers(
    dataset: Dataset,
    qids: list[str],
    first_stage: FirstStage,
    reranker: Reranker | None,
    config: ReplayConfig,
    progress: Progress | None,
    task: object,
    workers: int,
) -> list[QueryRecord]:
    results: list[QueryRecord | None] = [None] * len(qids)
    failures: list[BaseException] = []
    lock = threading.Lock()
    next_index = [0]
    t0 = time.perf_counter()

    def work() -> None:
        try:
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= len(qids) or failures:
                    return
                due = None
                if config.qps:
                    due = t0 + i / config.qps
                    delay = due - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                results[i] = run_query(dataset, qids[i], first_stage, reranker, config, due)
                advance(progress, task)
        except BaseException as exc:  # a first-stage failure ends the replay; re-raised on the main thread
            with lock:
                failures.append(exc)
        finally:
            first_stage.thread_exit()

    threads = [
        threading.Thread(target=work, name=f"replay-{n}", daemon=True) for n in range(min(workers, len(qids)))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return [r for r in results if r is not None]
