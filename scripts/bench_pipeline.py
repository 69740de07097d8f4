"""Where a lone request's time goes in the serving pipeline, before and after tokenize-once (issue 13).

Runs the rerank service in-process (no network) on the MiniLM-L6-shaped random cross-encoder and SciFact
BM25 top-`depth` pairs (title + text, natural length), once per code tree: `--before REV` is extracted
with `git archive` and measured in a subprocess with the same hooks, then this tree. Per mode:

- a lone request, `--lone` times (each after the same request once unmeasured, so the CPU kernels have
  met its batch shapes): its latency split into measure (tokenize threads), queue, pre (in the model
  thread: re-tokenizing before, stacking encodings after), forward (the model), post and the rest;
  against its pure compute, the same batches' forward passes re-run in-process right after it;
- throughput: `--requests` requests from `--concurrency` concurrent clients, pairs/s.

The machine may be shared: the ratios (lone p50 / pure compute, after / before) are what to read.
Writes JSON and a PNG (matplotlib) to --out.

    PYTHONPATH=$PWD python scripts/bench_pipeline.py --before e47145c --dtype auto --out bench-pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def scifact_requests(dataset_dir: str, queries: int, depth: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(query, [(title, text), ...])]: BM25 top-`depth` of the first `queries` SciFact test queries."""
    from sidecar.eval import datasets
    from sidecar.eval.bm25 import LuceneBm25

    path, name = datasets.resolve(dataset_dir, "scifact", download_ok=False)
    ds = datasets.load(path, "test", name)
    bm25 = LuceneBm25(ds)
    out = []
    for qid in ds.query_ids(queries):
        q = ds.queries[qid]
        docs = [ds.corpus[h.doc_id] for h in bm25.search(q, depth)]
        out.append((q, [(d.title, d.text) for d in docs]))
    bm25.close()
    return out


class Hooks:
    """Times the pipeline's stages by wrapping methods both code trees have (service._measure,
    scorer.score, model.preprocess, model.forward, and _collate where it exists)."""

    def __init__(self, service: Any) -> None:
        self.t: dict[str, float] = {"measure": 0.0, "score": 0.0, "pre": 0.0, "forward": 0.0}
        self.captured: list[dict[str, Any]] = []
        scorer = service.scorer
        model = scorer.model
        self._wrap_async(service, "_measure", "measure")
        self._wrap(scorer, "score", "score")
        self._wrap(model, "preprocess", "pre")
        if hasattr(scorer, "_collate"):
            self._wrap(scorer, "_collate", "pre")
        forward = model.forward

        def timed_forward(features: dict[str, Any], *a: Any, **kw: Any) -> Any:
            self.captured.append(dict(features))
            t0 = time.perf_counter()
            try:
                return forward(features, *a, **kw)
            finally:
                self.t["forward"] += time.perf_counter() - t0

        model.forward = timed_forward
        self.model = model
        self.forward = forward

    def _wrap(self, obj: Any, name: str, key: str) -> None:
        inner = getattr(obj, name)

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.t[key] += time.perf_counter() - t0

        setattr(obj, name, timed)

    def _wrap_async(self, obj: Any, name: str, key: str) -> None:
        inner = getattr(obj, name)

        async def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await inner(*a, **kw)
            finally:
                self.t[key] += time.perf_counter() - t0

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.t = dict.fromkeys(self.t, 0.0)
        self.captured = []

    def pure_compute(self) -> float:
        """The captured batches' forward passes again, in-process, nothing else."""
        import torch

        t0 = time.perf_counter()
        with torch.inference_mode():
            for features in self.captured:
                self.forward(features)
        return time.perf_counter() - t0


async def _measure_mode(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    import torch

    from sidecar.metrics import Metrics
    from sidecar.model_factory import build_minilm_l6_cross_encoder
    from sidecar.service import RerankService
    from sidecar.settings import Settings
    from sidecar.types import Document, RerankQuery

    work = scifact_requests(args.dataset_dir, max(args.lone, args.requests), args.depth)
    model_dir = build_minilm_l6_cross_encoder(Path(args.model_root) / "minilm-l6-ce")
    settings = Settings.model_validate(
        {
            "model": str(model_dir),
            "dtype": args.dtype,
            "score_cache_bytes": 0,
            "max_documents": max(1000, args.depth),
            "fusion": "none",
            "default_timeout_s": 3600,
        }
    )
    service = RerankService(settings, Metrics())
    await service.start()
    hooks = Hooks(service)

    def query(i: int, depth: int = args.depth) -> RerankQuery:
        q, docs = work[i % len(work)]
        documents = [Document(text, title=title) for title, text in docs[:depth]]
        return RerankQuery(q, documents, bypass_cache=True)

    lone = []
    for i in range(args.lone):
        # The same request once unmeasured first: a batch shape the CPU kernels meet for the first time
        # costs extra (primitive creation), and the pure-compute re-run below would meet it warm.
        await service.rerank(query(i), "bench")
        hooks.reset()
        t0 = time.perf_counter()
        result = await service.rerank(query(i), "bench")
        total = time.perf_counter() - t0
        t = dict(hooks.t)
        pure = hooks.pure_compute()
        lone.append(
            {
                "total": total,
                "measure": t["measure"],
                "queue": result.timings.queue_seconds,
                "pre": t["pre"],
                "forward": t["forward"],
                "post": t["score"] - t["pre"] - t["forward"],
                "pure_compute": pure,
                "batches": result.timings.batches,
            }
        )
        print(f"lone {i}: {json.dumps({k: round(v, 4) for k, v in lone[-1].items()})}", file=sys.stderr)

    hooks.reset()
    pending = list(range(args.requests))
    latencies: list[float] = []

    async def client() -> None:
        while pending:
            i = pending.pop(0)
            t0 = time.perf_counter()
            await service.rerank(query(i, args.throughput_depth), "bench")
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    wall = time.perf_counter() - t0
    pairs = sum(len(work[i % len(work)][1][: args.throughput_depth]) for i in range(args.requests))
    await service.close()
    return {
        "lone": lone,
        "throughput": {
            "pairs_per_s": pairs / wall,
            "wall_s": wall,
            "pairs": pairs,
            "p50_s": statistics.median(latencies),
            "forward_s": hooks.t["forward"],
            "pre_s": hooks.t["pre"],
        },
        "torch_threads": torch.get_num_threads(),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset)"),
    }


def _summary(mode: dict[str, Any]) -> dict[str, float]:
    lone = mode["lone"]
    med = {k: statistics.median(r[k] for r in lone) for k in lone[0]}
    ratios = [r["total"] / r["pure_compute"] for r in lone]
    return {
        **{f"lone_{k}_s": v for k, v in med.items() if k != "batches"},
        "lone_over_pure_p50": statistics.median(ratios),
        "pairs_per_s": mode["throughput"]["pairs_per_s"],
    }


def _run_tree(tree: Path, args: argparse.Namespace, clean_env: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    if clean_env:
        env.pop("TOKENIZERS_PARALLELISM", None)  # what the old server ran with
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", out.name]
        cmd += [
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("depth", "lone", "requests", "concurrency", "dtype", "throughput_depth")
        ]
        cmd += [f"--model-root={args.model_root}", f"--dataset-dir={args.dataset_dir}"]
        subprocess.run(cmd, env=env, cwd=tree, check=True)
        return dict(json.loads(Path(out.name).read_text()))


def _figure(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("before", "after") if m in result]
    a = result["args"]
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [3, 2, 1.4]})
    stages = ["measure", "queue", "pre", "forward", "post", "other"]
    colors = ["#8da0cb", "#e78ac3", "#fc8d62", "#66c2a5", "#a6d854", "#cccccc"]
    for y, m in enumerate(modes):
        s = result[m]["summary"]
        parts = {k: s.get(f"lone_{k}_s", 0.0) for k in stages[:-1]}
        parts["other"] = max(0.0, s["lone_total_s"] - sum(parts.values()))
        left = 0.0
        for k, c in zip(stages, colors, strict=True):
            ax1.barh(y, parts[k], left=left, color=c, label=k if y == 0 else None)
            left += parts[k]
        ax1.plot([s["lone_pure_compute_s"]] * 2, [y - 0.4, y + 0.4], "k--")
        ax1.text(0.3, y + 0.25, f"p50 {s['lone_over_pure_p50']:.3f}x its pure compute (dashed)", fontsize=8)
        # Everything but the forward pass, in milliseconds: where tokenize-once acts.
        left = 0.0
        for k, c in zip(stages, colors, strict=True):
            if k == "forward":
                continue
            ax3.barh(y, parts[k] * 1000, left=left, color=c)
            left += parts[k] * 1000
    ax1.set_yticks(range(len(modes)), modes)
    ax1.set_xlabel(f"lone top-{a['depth']} request, median seconds per stage")
    ax1.legend(fontsize=7, ncol=3, loc="lower right")
    ax3.set_yticks(range(len(modes)), modes)
    ax3.set_xlabel("the same without the forward pass, ms")
    rates = [result[m]["summary"]["pairs_per_s"] for m in modes]
    ax2.bar(modes, rates, color=["#bbbbbb", "#66c2a5"][: len(modes)])
    ax2.set_ylabel(
        f"pairs/s: {a['requests']} x {a['throughput_depth']} pairs, concurrency {a['concurrency']}"
    )
    for x, r in enumerate(rates):
        ax2.text(x, r, f"{r:.2f}", ha="center", va="bottom")
    fig.suptitle(
        f"Tokenize once + next batch formed while one runs; dtype {a['dtype']}, medians of {a['lone']} "
        "(machine shared with other work: read the ratios)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default=None, help="git revision of the 'before' code (omit: after only)")
    p.add_argument("--depth", type=int, default=100, help="BM25 hits per request")
    p.add_argument("--lone", type=int, default=3, help="lone requests per mode")
    p.add_argument("--requests", type=int, default=8, help="requests in the concurrency run")
    p.add_argument(
        "--throughput-depth", type=int, default=100, help="pairs per request in the concurrency run"
    )
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--dataset-dir", default=str(ROOT.parent / "shared" / "data" / "beir" / "scifact"))
    p.add_argument("--out", default="bench-pipeline", help="directory for pipeline.json and pipeline.png")
    p.add_argument("--model-root", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--plot", default=None, help="only redraw the PNG from this pipeline.json")
    args = p.parse_args()
    if args.plot:
        _figure(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return 0
    if args.child:
        import asyncio

        Path(args.child).write_text(json.dumps(asyncio.run(_measure_mode(args))))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"args": vars(args), "machine": os.uname().nodename, "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        args.model_root = tmp
        if args.before:
            before = Path(tmp) / "before"
            before.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.before], check=True, capture_output=True
            )
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
            result["before"] = _run_tree(before, args, clean_env=True)
        result["after"] = _run_tree(ROOT, args, clean_env=False)
    for m in ("before", "after"):
        if m in result:
            result[m]["summary"] = _summary(result[m])
            print(m, json.dumps({k: round(v, 4) for k, v in result[m]["summary"].items()}))
    if "before" in result:
        b, a = result["before"]["summary"], result["after"]["summary"]
        result["after_over_before"] = {
            "lone_total_p50": a["lone_total_s"] / b["lone_total_s"],
            "pairs_per_s": a["pairs_per_s"] / b["pairs_per_s"],
        }
        print("after/before", json.dumps(result["after_over_before"]))
    (out / "pipeline.json").write_text(json.dumps(result, indent=1))
    _figure(result, out / "pipeline.png")
    print(f"wrote {out / 'pipeline.json'} and {out / 'pipeline.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
