"""Partial results: coverage at a tight deadline under load, through a real in-process server and gRPC
clients.

Each round sends --concurrency requests of --docs documents at once, each with a --deadline-ms gRPC
deadline and a query not seen before (the score cache is off), first with partial_results (the answer at
the deadline: pairs scored so far plus the rest FALLBACK) and then, as the baseline, the same load without
it (DEADLINE_EXCEEDED for whatever does not finish). Reported: the share of each request's pairs that came
back scored (median, min, mean), the share of requests answered complete, whether the scored pairs were
always the head of the list (documents carry no first-stage scores here, so the head is the input order),
and for the baseline how many requests failed. Documents are SciFact's (title + text) when present, else
synthetic sentences. The default model is a tiny random BERT (max_length 256).

    PYTHONPATH=. python scripts/bench_partial_results.py [--model DIR] [--dtype D] [--rounds 5]
        [--concurrency 8] [--docs 100] [--deadline-ms 1000] [--margin-ms 100] [--max-batch-tokens N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from sidecar.client import RerankerClient
from sidecar.server import running
from sidecar.settings import Settings
from sidecar.types import Document, HitStatus

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "beir" / "scifact" / "corpus.jsonl"


def documents(n: int) -> list[Document]:
    docs = []
    if SCIFACT.exists():
        with SCIFACT.open() as f:
            for line in f:
                row = json.loads(line)
                docs.append(Document(text=row["text"], title=row.get("title") or None, id=row["_id"]))
                if len(docs) == n:
                    return docs
    return [Document(text=f"Synthetic document {i} about cells, proteins and experiments.") for i in range(n)]


def one(
    client: RerankerClient, query: str, docs: list[Document], deadline_s: float, partial: bool
) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        result = client.rerank(query, docs, timeout=deadline_s, partial_results=partial)
    except grpc.RpcError as exc:
        return {"error": exc.code().name, "seconds": time.perf_counter() - t0}
    scored = sorted(h.index for h in result.hits if h.status is HitStatus.RERANKED)
    return {
        "coverage": len(scored) / len(docs),
        "head": scored == list(range(len(scored))),
        "seconds": time.perf_counter() - t0,
    }


def load(target: str, docs: list[Document], args: argparse.Namespace, partial: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with RerankerClient(target) as client, ThreadPoolExecutor(args.concurrency) as pool:
        client.rerank("warm-up", docs[:8], timeout=60)
        for r in range(args.rounds):
            futures = [
                pool.submit(
                    one,
                    client,
                    f"what regulates cell growth ({partial} {r}.{c})",
                    docs,
                    args.deadline_ms / 1000,
                    partial,
                )
                for c in range(args.concurrency)
            ]
            out += [f.result() for f in futures]
            time.sleep(args.deadline_ms / 1000)  # let the abandoned work drain before the next round
    return out


async def main_async(args: argparse.Namespace) -> None:
    model = args.model
    if model is None:
        from sidecar.model_factory import build_bert_cross_encoder

        model = str(build_bert_cross_encoder(Path(tempfile.mkdtemp()) / "tiny-bert-ce", max_length=256))
    settings = Settings(  # type: ignore[call-arg]
        model=model,
        dtype=args.dtype,
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        score_cache_bytes=0,
        fusion="none",
        partial_results_margin_ms=args.margin_ms,
        **({"max_batch_tokens": args.max_batch_tokens} if args.max_batch_tokens else {}),
    )
    docs = documents(args.docs)
    async with running(settings) as server:
        info = server.service.info()
        target = f"127.0.0.1:{server.grpc_port}"
        partial = await asyncio.to_thread(load, target, docs, args, True)
        baseline = await asyncio.to_thread(load, target, docs, args, False)
    cover = [r["coverage"] for r in partial if "coverage" in r]
    errors = [r["error"] for r in partial if "error" in r]
    failed = sum("error" in r for r in baseline)
    print(
        f"{info.model_id} ({info.backend}, {info.dtype}, max_length {info.max_length}); "
        f"{args.rounds} rounds x {args.concurrency} concurrent {len(docs)}-document requests, "
        f"deadline {args.deadline_ms:g} ms, margin {settings.partial_results_margin_ms:g} ms, "
        f"max_batch_tokens {settings.max_batch_tokens}"
    )
    if cover:
        print(
            f"partial_results: pairs scored per request median {statistics.median(cover):.0%}, "
            f"min {min(cover):.0%}, mean {statistics.mean(cover):.0%}; complete "
            f"{sum(c == 1 for c in cover)}/{len(partial)}; scored pairs the head of the list in "
            f"{sum(r.get('head', False) for r in partial)}/{len(cover)}; "
            f"errors {len(errors)} {set(errors) or ''}; "
            f"latency median {statistics.median(r['seconds'] for r in partial) * 1000:.0f} ms"
        )
    print(
        f"baseline (no partial_results): {failed}/{len(baseline)} requests failed "
        f"({set(r['error'] for r in baseline if 'error' in r) or 'none'}), their scored pairs thrown away"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: a tiny random BERT)")
    p.add_argument("--dtype", default="auto", help="as serve --dtype")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--docs", type=int, default=100)
    p.add_argument("--deadline-ms", type=float, default=1000)
    p.add_argument("--margin-ms", type=float, default=100, help="partial_results_margin_ms")
    p.add_argument("--max-batch-tokens", type=int, default=0, help="as serve (default: the server's)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
