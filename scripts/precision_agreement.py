"""What a precision costs in score agreement: one scorer per precision on the same SciFact BM25 pairs.

    python scripts/precision_agreement.py [--queries 50] [--depth 100] [--model DIR] [--dtype bfloat16]
        [--config RUNTIME:DTYPE[:QUANTIZE] ...] [--export-cache-dir DIR]

Scores the first N SciFact test queries' BM25 top-k with float32 PyTorch (the reference) and each
`--dtype` (PyTorch) and `--config` (any runtime, docs/runtimes.md), then prints max and median |score diff|,
how many queries keep the float32 top-10 order and set, nDCG@10 of both and the pairs/s of each, with the
CPU's flags. The reference runs again after the last configuration and its speed is the mean of both runs.
`torch:bfloat16-cast` is PyTorch bf16 with the whole model cast to bf16 (the sidecar's CPU bf16 is
autocast; this measures what that choice is worth). The README's precision table comes from this script.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--model", default=None, help="model (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--dtype", action="append", default=None, help="precision(s) to compare with float32")
    p.add_argument(
        "--config", action="append", default=[], help="RUNTIME:DTYPE[:QUANTIZE], e.g. openvino:bfloat16:int8"
    )
    p.add_argument("--export-cache-dir", default=None)
    p.add_argument("--dataset-dir", default=None)
    args = p.parse_args()

    from sidecar.eval import datasets
    from sidecar.eval.bm25 import LuceneBm25
    from sidecar.eval.metrics import evaluate_scored
    from sidecar.scoring.base import Pair
    from sidecar.scoring.device import cpu_has_native_bf16
    from sidecar.scoring.loading import load_scorer
    from sidecar.settings import Settings

    path, name = datasets.resolve(args.dataset_dir, None, download_ok=False)
    data = datasets.load(path, split="test", name=name)
    bm25 = LuceneBm25(data)
    qids = data.query_ids(args.queries)
    lists = {q: [h.doc_id for h in bm25.search(data.queries[q], args.depth)] for q in qids}
    pairs = [Pair(data.queries[q], data.corpus[d].joined()) for q in qids for d in lists[q]]
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in cpuinfo]
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "?"
    )
    print(
        f"CPU: {model} ({platform.machine()}), flags {' '.join(flags)}; "
        f"native bf16: {cpu_has_native_bf16()}; {len(qids)} queries, {len(pairs)} pairs"
    )

    def run(config: str) -> tuple[np.ndarray, float]:
        from unittest import mock

        from sidecar.scoring import runtimes

        runtime, dtype, quantize = (
            [*config.split(":"), "none"] if ":" in config else ["torch", config, "none"]
        )[:3]
        whole_cast = dtype == "bfloat16-cast"
        kw = {
            "model": args.model,
            "runtime": runtime,
            "dtype": dtype.removesuffix("-cast"),
            "quantize": quantize,
        }
        if args.export_cache_dir:
            kw["export_cache_dir"] = args.export_cache_dir
        with (
            mock.patch.object(runtimes, "bf16_autocast", lambda placement: False)
            if whole_cast
            else _nothing()
        ):
            scorer = load_scorer(Settings(**kw))
        scorer.score(pairs[:8])  # warm-up
        if hasattr(scorer, "cache"):  # an empty document cache, as a fresh sidecar has
            scorer.cache = type(scorer.cache)(scorer.cache.max_bytes)
        t0 = time.perf_counter()
        out = np.concatenate([scorer.score(pairs[i : i + 32]) for i in range(0, len(pairs), 32)])
        return out, len(pairs) / (time.perf_counter() - t0)

    def split(scores: np.ndarray) -> dict[str, tuple[list[str], list[float]]]:
        out, i = {}, 0
        for q in qids:
            n = len(lists[q])
            out[q] = (lists[q], [float(s) for s in scores[i : i + n]])
            i += n
        return out

    ref, ref_speed = run("torch:float32")
    ref_q = split(ref)
    ref_ndcg = evaluate_scored(data.qrels, ref_q, ["ndcg@10"])["ndcg@10"]
    print(
        "| precision | max abs diff | median abs diff | top-10 order kept | top-10 set kept | nDCG@10 "
        "| pairs/s |\n| --- | --- | --- | --- | --- | --- | --- |\n"
        f"| float32 (reference) | 0 | 0 | {len(qids)}/{len(qids)} | {len(qids)}/{len(qids)} "
        f"| {ref_ndcg:.4f} | {ref_speed:.1f} |"
    )
    configs = [*(args.dtype or ([] if args.config else ["bfloat16"])), *args.config]
    rows = []
    for dtype in configs:
        rows.append((dtype, *run(dtype)))
    _, again = run("torch:float32")
    ref_speed = (ref_speed + again) / 2
    print(f"(reference pairs/s: mean of {ref_speed:.1f} before and after)")
    for dtype, got, speed in rows:
        diff = np.abs(got - ref)
        got_q = split(got)
        order = same_set = 0
        for q in qids:
            top = [d for _, d in sorted(zip([-s for s in ref_q[q][1]], lists[q], strict=True))][:10]
            mine = [d for _, d in sorted(zip([-s for s in got_q[q][1]], lists[q], strict=True))][:10]
            order += top == mine
            same_set += set(top) == set(mine)
        ndcg = evaluate_scored(data.qrels, got_q, ["ndcg@10"])["ndcg@10"]
        n = len(qids)
        print(
            f"| {dtype} | {diff.max():.2e} | {np.median(diff):.2e} | {order}/{n} | {same_set}/{n} "
            f"| {ndcg:.4f} | {speed:.1f} ({speed / ref_speed:.2f}x) |"
        )
    bm25.close()
    return 0


def _nothing():  # type: ignore[no-untyped-def]
    import contextlib

    return contextlib.nullcontext()


if __name__ == "__main__":
    raise SystemExit(main())
