"""What an LLM reranker costs per pair on CPU, against a MiniLM-L6-shaped cross-encoder in the same run.

Usage: python scripts/bench_llm.py [--pairs 32] [--batch 8] [--reason-tokens 64] [--dtype float32] [--out F]

All models have random weights (built here, nothing downloaded); cost depends on shape, not weights:
- baseline: MiniLM-L6-shaped BERT cross-encoder (6 layers, hidden 384), our cross-encoder scorer;
- a small Qwen3 causal LM (default 8 layers, hidden 512, 8 heads, MLP 1536, ~25M parameters without
  embeddings; tokenizer of 700 BPE tokens, so the output layer is far cheaper than Qwen's 151k vocabulary):
  - one forward pass, last-position logits (Qwen3-Reranker / mxbai / bge-gemma families);
  - ERank forced-answer mode (prompt + at most 6 generated tokens);
  - ERank reasoning: `--reason-tokens` generated per pair (a random model never closes its answer, so
    every pair decodes the whole budget; real ERank reasons for hundreds of tokens).
Pairs are SciFact queries x passages (cut to 1000 characters) when the shared data is there, else built-in
text. Scorers run in-process, batch by batch, as the sidecar's worker thread runs them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _pairs(n: int) -> list[Any]:
    from sidecar.scoring.base import Pair
    from tests.texts import documents, queries

    docs = [d[:1000] for d in documents(max(4, n // 2))]
    qs = queries(4)
    return [Pair(qs[i % len(qs)], docs[i % len(docs)]) for i in range(n)]


def _time(scorer: Any, pairs: list[Any], batch: int) -> dict[str, float]:
    scorer.score(pairs[:2])  # warm-up
    lat = []
    started = time.perf_counter()
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        t0 = time.perf_counter()
        scorer.score(chunk)
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    tokens = [m.tokens for m in scorer.measure(pairs)]
    return {
        "pairs_per_s": len(pairs) / wall,
        "batch_latency_p50_s": statistics.median(lat),
        "seconds_per_pair": wall / len(pairs),
        "budget_tokens_per_pair": statistics.mean(tokens),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="pairs per forward pass / generate call")
    p.add_argument("--reason-tokens", type=int, default=64, help="tokens ERank generates per pair")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()

    from sidecar.model_factory import (
        build_causal_lm,
        build_llm_tokenizer,
        build_minilm_l6_cross_encoder,
        llm_tokenizer_corpus,
    )
    from sidecar.scoring.loading import load_scorer
    from sidecar.settings import Settings

    pairs = _pairs(args.pairs)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ce = build_minilm_l6_cross_encoder(Path(tmp) / "minilm-l6-ce")
        llm = Path(tmp) / "qwen3-small"
        tok = build_llm_tokenizer(llm, llm_tokenizer_corpus())
        build_causal_lm(
            llm, tok, hidden=args.hidden, layers=args.layers, heads=8, intermediate=args.hidden * 3, seed=0
        )
        # ERank cuts query and document itself (llm_field_tokens); the others truncate pairs at 512.
        configs = [
            ("cross-encoder MiniLM-L6 shape (baseline)", ce, {"max_length": 512}),
            (
                "causal LM, last-position logits (qwen3-reranker)",
                llm,
                {"llm_family": "qwen3-reranker", "max_length": 512},
            ),
            (
                "causal LM, ERank forced answer (<= 6 tokens)",
                llm,
                {"llm_family": "erank", "llm_forced_answer": True},
            ),
            (
                f"causal LM, ERank reasoning ({args.reason_tokens} tokens)",
                llm,
                {"llm_family": "erank", "llm_max_new_tokens": args.reason_tokens},
            ),
        ]
        for name, model, extra in configs:
            scorer = load_scorer(Settings(model=str(model), dtype=args.dtype, **extra))  # type: ignore[arg-type]
            figures = _time(scorer, pairs, args.batch)
            rows.append({"name": name, **figures})
            print(f"{name}: {figures['pairs_per_s']:.2f} pairs/s", file=sys.stderr)
    base = rows[0]["pairs_per_s"]
    print(
        f"{len(pairs)} pairs, batches of {args.batch}, {args.dtype}, causal LM: Qwen3 {args.layers} layers, "
        f"hidden {args.hidden}, 8 heads (4 KV), MLP {args.hidden * 3}, vocab {len(tok)}"
    )
    print("| configuration | pairs/s | x baseline | s per pair | batch p50 s | budget tokens/pair |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['name']} | {r['pairs_per_s']:.2f} | {r['pairs_per_s'] / base:.3f} | "
            f"{r['seconds_per_pair']:.3f} | {r['batch_latency_p50_s']:.2f} | "
            f"{r['budget_tokens_per_pair']:.0f} |"
        )
    agreement = _forced_agreement(args.dtype)
    print(
        "ERank forced answer vs full reasoning on the tiny ERank-format model (seed 4, "
        f"{agreement['queries']} queries x {agreement['docs']} documents): same answer N for "
        f"{agreement['same_answer']:.0%} of pairs, same top-1 for {agreement['same_top1']}/"
        f"{agreement['queries']} queries, mean Kendall tau {agreement['kendall_tau']:.2f}"
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"rows": rows, "agreement": agreement, "args": vars(args)}, indent=2)
        )
    return 0


def _forced_agreement(dtype: str) -> dict[str, Any]:
    """Rank agreement of ERank's forced-answer mode with full decoding, on the tiny model whose output layer
    writes ERank's format (sidecar.model_factory.build_erank_like); says nothing about real weights."""
    import numpy as np
    from scipy.stats import kendalltau

    from sidecar.model_factory import build_erank_like
    from sidecar.scoring.base import Pair
    from sidecar.scoring.loading import load_scorer
    from sidecar.settings import Settings
    from tests.texts import documents, queries

    docs = [d[:400] for d in documents(8)]
    with tempfile.TemporaryDirectory() as tmp:
        model = build_erank_like(Path(tmp) / "ERank-tiny", seed=4)
        full = load_scorer(Settings(model=str(model), dtype=dtype, llm_max_new_tokens=16))  # type: ignore[call-arg, arg-type]
        fast = load_scorer(Settings(model=str(model), dtype=dtype, llm_forced_answer=True))  # type: ignore[call-arg, arg-type]
        same_top1, taus, same_n, total = 0, [], 0, 0
        for q in queries(3):
            pairs = [Pair(q, d) for d in docs]
            a, b = full.score(pairs), fast.score(pairs)
            same_top1 += int(np.argmax(a) == np.argmax(b))
            tau = kendalltau(a, b).statistic
            taus.append(0.0 if np.isnan(tau) else float(tau))
            ta = [full.tokenizer.decode(g) for g, _ in full._hf_generate(full._encode(pairs))]  # type: ignore[attr-defined]
            tb = [fast.tokenizer.decode(g) for g, _ in fast._hf_generate(fast._encode(pairs))]  # type: ignore[attr-defined]
            for x, y in zip(ta, tb, strict=True):
                nx = x.split("<answer>")[-1].split("</answer>")[0] if "<answer>" in x else None
                ny = y.split("</answer>")[0]
                same_n += int(nx == ny)
                total += 1
    return {
        "queries": 3,
        "docs": len(docs),
        "same_top1": same_top1,
        "kendall_tau": float(np.mean(taus)),
        "same_answer": same_n / total,
    }


if __name__ == "__main__":
    raise SystemExit(main())
