"""Score cache: latency of a 100-document rerank answered from the cache (hit) against the same request
scored by the model (miss), through a real in-process server and the gRPC client.

Each run sends a query not seen before (a miss: hashed, scored, stored), then the same request again (a
hit: no forward pass), then the same request with bypass_cache (scored by the model, the cache untouched).
Medians over --runs. Documents are the first --docs SciFact documents (title + text) when the data set is
present, else synthetic sentences. The default model is the packaged one.

    PYTHONPATH=. python scripts/bench_score_cache.py [--model DIR | --tiny-bert] [--dtype D] [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from sidecar.client import RerankerClient
from sidecar.server import running
from sidecar.settings import Settings
from sidecar.types import Document

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "beir" / "scifact" / "corpus.jsonl"


def documents(n: int) -> list[Document]:
    if SCIFACT.exists():
        docs = []
        with SCIFACT.open() as f:
            for line in f:
                row = json.loads(line)
                docs.append(Document(text=row["text"], title=row.get("title") or None, id=row["_id"]))
                if len(docs) == n:
                    return docs
    return [Document(text=f"Synthetic document {i} about cells, proteins and experiments.") for i in range(n)]


def timed(client: RerankerClient, query: str, docs: list[Document], bypass: bool) -> tuple[float, int]:
    t0 = time.perf_counter()
    result = client.rerank(query, docs, bypass_cache=bypass, timeout=120)
    return time.perf_counter() - t0, result.cached_pairs


def measure(target: str, docs: list[Document], runs: int) -> dict[str, float]:
    miss, hit, bypass = [], [], []
    with RerankerClient(target) as client:
        timed(client, "warm-up query", docs, False)
        for i in range(runs):
            query = f"which proteins regulate cell growth (run {i})"
            seconds, cached = timed(client, query, docs, False)
            assert cached == 0
            miss.append(seconds)
            seconds, cached = timed(client, query, docs, False)
            assert cached == len(docs)
            hit.append(seconds)
            seconds, cached = timed(client, query, docs, True)
            assert cached == 0
            bypass.append(seconds)
    return {
        name: statistics.median(v) * 1000 for name, v in (("miss", miss), ("hit", hit), ("bypass", bypass))
    }


async def main_async(args: argparse.Namespace) -> None:
    model = args.model
    if args.tiny_bert:
        from sidecar.model_factory import build_bert_cross_encoder

        model = str(build_bert_cross_encoder(Path(tempfile.mkdtemp()) / "tiny-bert-ce", max_length=256))
    settings = Settings(  # type: ignore[call-arg]
        model=model,
        dtype=args.dtype,
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        score_cache_bytes=64 << 20,
        fusion="none",
    )
    docs = documents(args.docs)
    async with running(settings) as server:
        info = server.service.info()
        target = f"127.0.0.1:{server.grpc_port}"
        ms = await asyncio.to_thread(measure, target, docs, args.runs)
    print(
        f"{info.model_id} ({info.backend}, {info.dtype}, max_length {info.max_length}), {len(docs)} docs, "
        f"median of {args.runs}: miss {ms['miss']:.1f} ms, hit {ms['hit']:.1f} ms "
        f"({ms['miss'] / ms['hit']:.0f}x), bypass {ms['bypass']:.1f} ms"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the packaged model)")
    p.add_argument("--tiny-bert", action="store_true", help="a tiny random BERT cross-encoder instead")
    p.add_argument("--dtype", default="auto", help="as serve --dtype")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--docs", type=int, default=100)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
