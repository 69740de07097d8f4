"""Choosing the score-fusion weights the honest way: on training-split queries only, through the sidecar.

Each query's BM25 top-`depth` is reranked once by a sidecar serving the model (fusion off, so the raw model
scores come back); every candidate fusion (none, blend over a grid of alpha with min-max and z-score
normalisation, RRF) is then applied offline with the same `sidecar.fusion.fuse` the server runs, and the one
with the best nDCG@10 is written to `fusion.json` next to the model, where `RERANK_FUSION=auto` picks it up.

Which queries: a fine-tuned model's held-out dev queries (`dev_qids.txt`, written by `finetune`), since it has
seen the others in training; for a model that never trained on this collection, the whole train split.
The test split is never opened.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.eval import datasets as beir
from sidecar.eval.metrics import evaluate_scored
from sidecar.fusion import FUSION_FILE, NO_FUSION, FusionMethod, FusionSpec, Normalization, fuse
from sidecar.training.evaluation import METRICS
from sidecar.training.finetune import read_dev_qids

ALPHAS = tuple(round(i * 0.05, 2) for i in range(21))


class FusionTuningError(Exception):
    """Fusion weights cannot be chosen as asked; the message says what to change."""


@dataclass(frozen=True)
class Candidates:
    """One query's first-stage hits with their first-stage and raw reranker scores (first-stage order)."""

    doc_ids: list[str]
    first_stage: list[float]
    rerank: list[float]


def candidate_specs(rrf_k: int = 60) -> list[FusionSpec]:
    """The grid, in preference order for ties: no fusion, blends from most to least reranker, then RRF."""
    specs = [NO_FUSION]
    for norm in (Normalization.MINMAX, Normalization.ZSCORE):
        specs += [FusionSpec(FusionMethod.BLEND, alpha=a, normalization=norm) for a in reversed(ALPHAS)]
    specs.append(FusionSpec(FusionMethod.RRF, rrf_k=rrf_k))
    return specs


def evaluate_spec(
    spec: FusionSpec, per_query: dict[str, Candidates], qrels: dict[str, dict[str, int]]
) -> dict[str, float]:
    """Metrics of each query's candidates ranked by `spec`'s fused score, as the sidecar would rank them."""
    fused = {q: (c.doc_ids, fuse(spec, c.rerank, c.first_stage)) for q, c in per_query.items()}
    return evaluate_scored(qrels, fused, METRICS)


def first_stage_metrics(
    per_query: dict[str, Candidates], qrels: dict[str, dict[str, int]]
) -> dict[str, float]:
    return evaluate_scored(qrels, {q: (c.doc_ids, c.first_stage) for q, c in per_query.items()}, METRICS)


def choose(
    per_query: dict[str, Candidates], qrels: dict[str, dict[str, int]]
) -> tuple[FusionSpec, list[tuple[FusionSpec, dict[str, float]]]]:
    """The best spec by nDCG@10 (earliest in `candidate_specs` order on ties) and the whole grid's figures."""
    grid = [(spec, evaluate_spec(spec, per_query, qrels)) for spec in candidate_specs()]
    best = max(range(len(grid)), key=lambda i: (grid[i][1]["ndcg@10"], -i))
    return grid[best][0], grid


def select_queries(
    data: beir.Dataset, model: Path | None, *, all_train: bool, max_queries: int | None
) -> tuple[list[str], str]:
    qids = data.query_ids()
    dev = read_dev_qids(model) if model is not None else None
    if dev is not None and not all_train:
        known = set(qids)
        missing = [q for q in dev if q not in known]
        if missing:
            raise FusionTuningError(
                f"{model}/dev_qids.txt names {len(missing)} queries (e.g. {missing[0]}) that are not in "
                f"{data.path}/qrels/train.tsv: was the model fine-tuned on another collection?"
            )
        chosen, label = dev, "the model's dev split (dev_qids.txt)"
    else:
        chosen, label = qids, "every train-split query"
    return (chosen[:max_queries] if max_queries else chosen), label


def output_path(model: Path | None, out: Path | None) -> Path:
    """Where fusion.json goes: `out` as a directory (existing or to be made) unless it names a *.json file;
    without `out`, the model directory."""
    if out is None:
        if model is None:
            raise FusionTuningError(
                "the packaged model lives inside the Python installation: pass --out DIR for its fusion.json"
            )
        return model / FUSION_FILE
    if out.is_dir() or out.suffix.lower() != ".json":
        return out / FUSION_FILE
    return out


def tune_fusion(
    *,
    model: Path | None,
    data: Path,
    depth: int = 100,
    out: Path | None = None,
    max_queries: int | None = None,
    all_train: bool = False,
    concurrency: int = 4,
    console: Any = None,
    cache_root: Path | None = None,
    target: str | None = None,
) -> dict[str, Any]:
    """Choose the fusion for `model` on `data`'s train split and write it; returns what was written.

    With `target`, an already running sidecar (serving `model`) is used instead of starting one.
    """
    from rich.console import Console

    from sidecar.eval.bm25 import LuceneBm25
    from sidecar.progress import progress_display

    console = console or Console(stderr=True)
    if depth < 2:
        raise FusionTuningError("--depth must be at least 2: fusion reorders a list")
    out = output_path(model, out)
    dataset = beir.load(data, split="train")
    qids, label = select_queries(dataset, model, all_train=all_train, max_queries=max_queries)
    console.print(
        f"[bold]tune-fusion:[/] {len(qids)} queries from {label} of {dataset.name}, BM25 top-{depth}"
    )

    with progress_display(console) as progress:
        bm25 = LuceneBm25(dataset, cache_root=cache_root, progress=progress)
        try:
            hits = {q: bm25.search(dataset.queries[q], depth) for q in qids}
        finally:
            bm25.close()
        per_query = _rerank_all(dataset, hits, model, target, concurrency, progress)

    qrels = dataset.qrels_for(list(per_query))
    best, grid = choose(per_query, qrels)
    baseline = first_stage_metrics(per_query, qrels)
    by_spec = {spec: m for spec, m in grid}
    record = {
        **best.to_dict(),
        "chosen_on": {
            "dataset": dataset.name,
            "path": str(dataset.path),
            "split": "train",
            "queries": len(per_query),
            "query_set": label,
            "first_stage": f"bm25 top-{depth}",
            "metric": "ndcg@10",
        },
        "ndcg@10": {
            "chosen": by_spec[best]["ndcg@10"],
            "no_fusion": by_spec[NO_FUSION]["ndcg@10"],
            "first_stage": baseline["ndcg@10"],
        },
        "grid": [{**spec.to_dict(), **metrics} for spec, metrics in grid],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    plot = _plot(grid, baseline, out.with_name("fusion_tuning.png"), best)
    card = out.parent / "README.md"
    if model is not None and out.parent == model and card.is_file():
        from sidecar.training.card import with_fusion_section

        card.write_text(with_fusion_section(card.read_text(), record))
    console.print(
        f"[bold]chosen:[/] {best.describe()}  nDCG@10 {by_spec[best]['ndcg@10']:.4f} "
        f"(no fusion {by_spec[NO_FUSION]['ndcg@10']:.4f}, BM25 {baseline['ndcg@10']:.4f}) -> {out}"
        + (f"; plot {plot}" if plot else "")
    )
    return record


def _rerank_all(
    dataset: beir.Dataset,
    hits: dict[str, list[Any]],
    model: Path | None,
    target: str | None,
    concurrency: int,
    progress: Any,
) -> dict[str, Candidates]:
    from contextlib import ExitStack

    import grpc

    from sidecar.client import RerankerClient
    from sidecar.launch import SidecarProcess
    from sidecar.types import Document

    with ExitStack() as stack:
        if target is None:
            task = progress.add_task("starting local sidecar", total=1)
            sc = stack.enter_context(SidecarProcess(["--model", str(model)] if model else []))
            progress.update(task, completed=1)
            target = sc.grpc_target
        client = stack.enter_context(RerankerClient(target))
        client.wait_ready(120.0)
        task = progress.add_task(f"reranking {len(hits)} queries", total=len(hits))
        lock = threading.Lock()
        out: dict[str, Candidates] = {}

        def one(qid: str) -> None:
            query_hits = hits[qid]
            if not query_hits:
                return
            docs = [
                Document(
                    text=dataset.corpus[h.doc_id].text,
                    title=dataset.corpus[h.doc_id].title or None,
                    id=h.doc_id,
                    first_stage_score=h.score,
                )
                for h in query_hits
            ]
            try:
                result = client.rerank(dataset.queries[qid], docs, fusion=NO_FUSION, timeout=600.0)
            except grpc.RpcError as exc:
                raise FusionTuningError(
                    f"the sidecar refused query {qid}: {exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
                ) from None
            raw = [0.0] * len(docs)
            for h in result.hits:
                raw[h.index] = float(h.score)
            with lock:
                out[qid] = Candidates([h.doc_id for h in query_hits], [h.score for h in query_hits], raw)
                progress.advance(task)

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(one, list(hits)))
    return {q: out[q] for q in hits if q in out}


def _plot(
    grid: list[tuple[FusionSpec, dict[str, float]]], baseline: dict[str, float], path: Path, best: FusionSpec
) -> Path | None:
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib is in the eval extra
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for norm in Normalization:
        points = sorted(
            (s.alpha, m["ndcg@10"])
            for s, m in grid
            if s.method is FusionMethod.BLEND and s.normalization is norm
        )
        ax.plot(
            [a for a, _ in points], [v for _, v in points], "o-", markersize=3, label=f"blend, {norm.value}"
        )
    for spec, metrics in grid:
        if spec.method is FusionMethod.RRF:
            ax.axhline(metrics["ndcg@10"], linestyle=":", color="tab:green", label=spec.describe())
    ax.axhline(baseline["ndcg@10"], linestyle="--", color="tab:gray", label="BM25 alone")
    ax.set_xlabel("alpha (0 = first-stage order, 1 = reranker order)")
    ax.set_ylabel("nDCG@10 (train/dev queries)")
    ax.set_title(f"fusion weight choice: {best.describe()}")
    ax.legend(loc="lower center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
