"""Benchmark: the running sidecar under N concurrent clients against sentence-transformers
`CrossEncoder.predict` (fp32, batch 32) on the same model and the same SciFact pairs, in one run.

Pairs are natural-length SciFact (title + text) BM25 top-`depth` hits of the first `queries` test
queries. The model is a MiniLM-L6-shaped cross-encoder (random weights unless --model is given).
Two baselines are timed: `predict` per request (what a server without cross-request batching does),
and one `predict` over all pairs at once (sentence-transformers sorting everything globally; the
strongest form of the baseline). Rankings are checked against the baseline per query.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset-dir", default=None, help="BEIR directory (default: ../shared/data/beir/scifact)"
    )
    p.add_argument("--queries", type=int, default=16, help="test queries to replay")
    p.add_argument("--depth", type=int, default=100, help="BM25 hits per query (pairs per request)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    p.add_argument("--model", default=None, help="cross-encoder directory (default: random MiniLM-L6-shaped)")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="extra `serve` flag, e.g. --serve-arg=--dtype=float32",
    )
    p.add_argument("--skip-global-baseline", action="store_true", help="time only the per-request baseline")
    p.add_argument("--out", default=None, help="write the figures as JSON here")


def _pairs(args: argparse.Namespace) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """[(query, [(doc_id, title, text), ...])] for the first `queries` test queries."""
    from sidecar.eval import datasets
    from sidecar.eval.bm25 import LuceneBm25

    path, name = datasets.resolve(args.dataset_dir, "scifact", download_ok=True)
    ds = datasets.load(path, "test", name)
    bm25 = LuceneBm25(ds)
    out = []
    for qid in ds.query_ids(args.queries):
        q = ds.queries[qid]
        hits = bm25.search(q, args.depth)
        out.append((q, [(h.doc_id, ds.corpus[h.doc_id].title, ds.corpus[h.doc_id].text) for h in hits]))
    bm25.close()
    return out


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from sidecar.eval.cache import cache_dir
    from sidecar.model_factory import build_minilm_l6_cross_encoder

    target = cache_dir() / "bench" / "minilm-l6-random-ce"
    if not (target / "config.json").exists():
        build_minilm_l6_cross_encoder(target)
    return target


def _percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs)
    return {f"p{p}": float(np.percentile(a, p)) for p in (50, 95, 99)}


def _baseline(model_dir: Path, work: list, per_request: bool) -> tuple[float, list[float], list[np.ndarray]]:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(model_dir), device="cpu")
    model.predict([("warm up", "the model")] * 4, batch_size=32)
    texts = [[(q, f"{t} {x}" if t else x) for _, t, x in docs] for q, docs in work]
    latencies: list[float] = []
    started = time.perf_counter()
    if per_request:
        scores = []
        for pairs in texts:
            t0 = time.perf_counter()
            scores.append(model.predict(pairs, batch_size=32, show_progress_bar=False))
            latencies.append(time.perf_counter() - t0)
    else:
        flat = model.predict([p for pairs in texts for p in pairs], batch_size=32, show_progress_bar=False)
        scores, i = [], 0
        for pairs in texts:
            scores.append(flat[i : i + len(pairs)])
            i += len(pairs)
    return time.perf_counter() - started, latencies, scores


def _sidecar(model_dir: Path, work: list, args: argparse.Namespace) -> dict[str, Any]:
    from sidecar.client import RerankerClient
    from sidecar.launch import SidecarProcess
    from sidecar.types import Document

    with (
        SidecarProcess(["--model", str(model_dir), *args.serve_arg]) as sc,
        RerankerClient(sc.grpc_target) as client,
    ):
        info = client.info()
        client.rerank("warm up", ["the model"] * 4)
        lock = threading.Lock()
        todo = list(enumerate(work))
        latencies: list[float] = []
        queue_s: list[float] = []
        scores: dict[int, np.ndarray] = {}

        def worker() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    i, (q, docs) = todo.pop(0)
                documents = [Document(text=x, id=d, title=t or None) for d, t, x in docs]
                t0 = time.perf_counter()
                result = client.rerank(q, documents, timeout=600)
                elapsed = time.perf_counter() - t0
                s = np.empty(len(docs), dtype=np.float32)
                for h in result.hits:
                    s[h.index] = h.score
                with lock:
                    latencies.append(elapsed)
                    queue_s.append(result.timings.queue_seconds)
                    scores[i] = s

        started = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
    return {
        "wall": wall,
        "latencies": latencies,
        "queue": queue_s,
        "scores": [scores[i] for i in range(len(work))],
        "dtype": info.dtype,
        "device": info.device,
        "attention": info.attention,
    }


def _ranking_check(ours: list[np.ndarray], ref: list[np.ndarray]) -> dict[str, Any]:
    top10_same = sum(
        list(np.argsort(-a, kind="stable")[:10]) == list(np.argsort(-b, kind="stable")[:10])
        for a, b in zip(ours, ref, strict=True)
    )
    full_same = sum(
        list(np.argsort(-a, kind="stable")) == list(np.argsort(-b, kind="stable"))
        for a, b in zip(ours, ref, strict=True)
    )
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, ref, strict=True))
    return {
        "queries": len(ref),
        "top10_identical": top10_same,
        "full_ranking_identical": full_same,
        "max_abs_score_diff": diff,
    }


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    with console.status("building BM25 top-k pairs and the model"):
        work = _pairs(args)
        model_dir = _model_dir(args)
    n_pairs = sum(len(d) for _, d in work)
    tokens = _token_stats(model_dir, work)
    console.print(
        f"{len(work)} queries, {n_pairs} pairs, tokens per pair median {tokens['median']:.0f}, "
        f"p90 {tokens['p90']:.0f}, truncated at 512: {tokens['truncated']:.1%}"
    )

    with console.status("baseline: CrossEncoder.predict per request (fp32, batch 32)"):
        base_wall, base_lat, base_scores = _baseline(model_dir, work, per_request=True)
    rows: list[dict[str, Any]] = [
        {
            "name": "sentence-transformers predict, per request (fp32, bs 32)",
            "pairs_per_s": n_pairs / base_wall,
            **_percentiles(base_lat),
            "lat_note": "sequential",
        }
    ]
    if not args.skip_global_baseline:
        with console.status("baseline: one CrossEncoder.predict over all pairs"):
            glob_wall, _, _ = _baseline(model_dir, work, per_request=False)
        rows.append(
            {
                "name": "sentence-transformers predict, all pairs at once (fp32, bs 32)",
                "pairs_per_s": n_pairs / glob_wall,
            }
        )
    with console.status(f"sidecar: {args.concurrency} concurrent gRPC clients"):
        side = _sidecar(model_dir, work, args)
    rows.append(
        {
            "name": f"sidecar ({side['dtype']}, {side['attention']}), concurrency {args.concurrency}",
            "pairs_per_s": n_pairs / side["wall"],
            **_percentiles(side["latencies"]),
            "queue_p50": statistics.median(side["queue"]),
        }
    )
    check = _ranking_check(side["scores"], base_scores)

    table = Table(title="rerank throughput (same model, same pairs, same run)")
    for col in ("configuration", "pairs/s", "x baseline", "p50 s", "p95 s", "p99 s"):
        table.add_column(col)
    base = rows[0]["pairs_per_s"]
    for r in rows:
        table.add_row(
            r["name"],
            f"{r['pairs_per_s']:.1f}",
            f"{r['pairs_per_s'] / base:.2f}",
            *(f"{r[k]:.2f}" if k in r else "-" for k in ("p50", "p95", "p99")),
        )
    console.print(table)
    console.print(
        "rankings vs per-request baseline: top-10 identical for "
        f"{check['top10_identical']}/{check['queries']}"
        f" queries, full order identical for {check['full_ranking_identical']}/{check['queries']}, "
        f"max |score diff| {check['max_abs_score_diff']:.2e}"
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "rows": rows,
                    "ranking_check": check,
                    "pairs": n_pairs,
                    "queries": len(work),
                    "tokens": tokens,
                    "concurrency": args.concurrency,
                },
                indent=2,
            )
        )
    return 0


def _token_stats(model_dir: Path, work: list) -> dict[str, float]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    lengths = [
        len(tok(q, f"{t} {x}" if t else x, truncation=False, verbose=False)["input_ids"])
        for q, docs in work
        for _, t, x in docs
    ]
    a = np.asarray(lengths)
    return {
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "truncated": float((a > 512).mean()),
    }
