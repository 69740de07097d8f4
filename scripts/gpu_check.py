"""The GPU check of the padding-free path (docs/gpu.md), in one command on a CUDA machine with flash-attn:

    python scripts/gpu_check.py [--models ettin-reranker-17m,...] [--out gpu_check.json]

1. Parity, bf16 on CUDA: tiny BERT and ModernBERT (modular head) cross-encoders and the 17m shape, the
   packed forward pass (flash-attn varlen) against the padded one (SDPA), both against fp32 padded.
2. In-process model throughput per release shape: packed + flash-attn against padded + SDPA, bf16.
3. End to end: the sidecar served on this GPU (bf16, flash_attention_2, max length 512), N gRPC clients,
   pairs/s against the Ettin release figures (H100, bf16, natural NQ lengths, max 512).

Models are built from config classes with the release shapes and random weights (speed does not depend
on the weights). Pairs have natural NQ lengths: a query of 6-14 words and a passage of a short title
and 100 words (BEIR NQ's DPR passages are 100-word splits), words drawn from the tokenizer's vocabulary;
`--dataset-dir` reads a BEIR directory's texts instead. Exits 1 with one line without CUDA or flash-attn.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Where and how the packed path runs; `--rehearse` swaps in the CPU, float32 and the reference kernel.
TARGET = {"device": "cuda", "dtype": "bfloat16", "attention": "flash_attention_2"}

# name: (family, shape, H100 bf16 pairs/s from the Ettin reranker release)
RELEASE: dict[str, tuple[str, dict[str, int], float]] = {
    "ms-marco-MiniLM-L6-v2": ("bert", {"hidden": 384, "layers": 6, "heads": 12, "intermediate": 1536}, 3817),
    "ettin-reranker-17m": ("modernbert", {"hidden": 256, "layers": 7, "heads": 4, "intermediate": 384}, 7517),
    "ettin-reranker-150m": (
        "modernbert",
        {"hidden": 768, "layers": 22, "heads": 12, "intermediate": 1152},
        3237,
    ),
    "ettin-reranker-1b": (
        "modernbert",
        {"hidden": 1792, "layers": 28, "heads": 28, "intermediate": 3840},
        928,
    ),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(RELEASE), help="comma-separated, from: " + ", ".join(RELEASE))
    p.add_argument("--queries", type=int, default=48, help="requests per model in the end-to-end run")
    p.add_argument("--depth", type=int, default=100, help="documents per request")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent gRPC clients")
    p.add_argument("--max-batch-tokens", type=int, default=32768, help="the sidecar's token budget")
    p.add_argument("--dataset-dir", default=None, help="a BEIR directory (corpus.jsonl, queries.jsonl)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache/rerank-sidecar/gpu-check"))
    p.add_argument("--skip-e2e", action="store_true", help="parity and in-process throughput only")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument(
        "--rehearse",
        action="store_true",
        help="run every step on the CPU in float32 with the reference varlen kernel: a check of this script "
        "before GPU time is spent on it; its figures mean nothing",
    )
    args = p.parse_args()

    import torch

    if args.rehearse:
        from sidecar.scoring import packing

        TARGET.update(device="cpu", dtype="float32", attention=packing.register_reference_attention())
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to PyTorch; this check needs an NVIDIA GPU (docs/gpu.md)")
        return 1
    elif importlib.util.find_spec("flash_attn") is None:
        print("gpu_check: flash-attn is not installed; pip install 'rerank-sidecar[gpu]' (docs/gpu.md)")
        return 1
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in RELEASE]
    if unknown:
        print(f"gpu_check: unknown model {unknown[0]!r}; choose from {', '.join(RELEASE)}")
        return 1

    device = torch.cuda.get_device_name(0) if TARGET["device"] == "cuda" else "CPU rehearsal"
    print(f"# {device}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    cache = Path(args.cache_dir)
    report: dict[str, Any] = {"device": device, "parity": parity(cache), "models": {}}
    work = natural_pairs(args)
    print(f"# pairs: {len(work)} requests x {args.depth}, {_mean_words(work):.0f} words per pair on average")
    ok = all(r["passed"] for r in report["parity"])
    for name in names:
        model_dir = build(name, cache)
        row = {"in_process": in_process(model_dir, work), "release_pairs_per_s": RELEASE[name][2]}
        if not args.skip_e2e:
            row["end_to_end"] = end_to_end(model_dir, work, args)
        report["models"][name] = row
        print_row(name, row)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print("gpu_check: parity " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


# ---- models ---------------------------------------------------------------------------------------
def build(name: str, cache: Path) -> Path:
    """A random-weight model of the release's shape, built once into the cache."""
    from sidecar.model_factory import build_bert_cross_encoder, build_modernbert_modular_cross_encoder

    target = cache / name
    if (target / "config.json").exists() or (target / "modules.json").exists():
        return target
    family, shape, _ = RELEASE[name]
    if family == "bert":
        return build_bert_cross_encoder(target, **shape)  # type: ignore[arg-type]
    return build_modernbert_modular_cross_encoder(target, **shape)  # type: ignore[arg-type]


def load(model_dir: Path, dtype: Any, attention: str) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(
        str(model_dir),
        device=TARGET["device"],
        model_kwargs={"dtype": dtype, "attn_implementation": attention},
    )


# ---- 1. parity ------------------------------------------------------------------------------------
def parity(cache: Path) -> list[dict[str, Any]]:
    """Packed bf16 must be as close to fp32 as padded bf16 is: error at most twice padded's plus 0.01."""
    import numpy as np
    import torch

    from sidecar.model_factory import build_bert_cross_encoder, build_modernbert_modular_cross_encoder
    from sidecar.scoring import packing

    dirs = {
        "tiny-bert": cache / "tiny-bert",
        "tiny-modernbert-modular": cache / "tiny-modernbert",
        "ettin-reranker-17m": build("ettin-reranker-17m", cache),
    }
    if not (dirs["tiny-bert"] / "config.json").exists():
        build_bert_cross_encoder(dirs["tiny-bert"], hidden=64, layers=2, heads=4, intermediate=128)
    if not (dirs["tiny-modernbert-modular"] / "modules.json").exists():
        build_modernbert_modular_cross_encoder(
            dirs["tiny-modernbert-modular"], hidden=64, layers=3, local_attention=16
        )
    rng = random.Random(0)
    words = ["vaccine", "immune", "cell", "protein", "market", "bank", "river", "virus", "the", "of"]
    # Very unequal lengths: 1 to 600 document words (truncated at 512 tokens).
    pairs = [
        (" ".join(rng.choices(words, k=rng.randint(1, 12))), " ".join(rng.choices(words, k=n)))
        for n in rng.choices([1, 5, 40, 200, 600], k=64)
    ]
    out = []
    for name, d in dirs.items():
        ref = load(d, torch.float32, "sdpa")
        padded16 = load(d, _low(), "sdpa")
        packed16 = load(d, _low(), TARGET["attention"])
        assert packing.supports_packing(packed16), packing.why_not_packed(packed16)
        features = ref.preprocess(pairs)  # padded (the fp32 SDPA model never flattens)
        with torch.inference_mode():
            want = _padded_scores(ref, features)
            got_padded = _padded_scores(padded16, features)
            got_packed = packing.packed_forward(packed16, {k: v for k, v in features.items()}).numpy()
        err_padded = float(np.abs(got_padded - want).max())
        err_packed = float(np.abs(got_packed - want).max())
        row = {
            "model": name,
            "max_abs_packed_vs_fp32": err_packed,
            "max_abs_padded_vs_fp32": err_padded,
            "max_abs_packed_vs_padded": float(np.abs(got_packed - got_padded).max()),
            "passed": err_packed <= 2 * err_padded + 1e-2,
        }
        verdict = "ok" if row["passed"] else "FAIL"
        print(f"parity {name:24s} |packed-fp32| {err_packed:.4f}  |padded-fp32| {err_padded:.4f}  {verdict}")
        out.append(row)
        del ref, padded16, packed16
        _free()
    return out


def _padded_scores(model: Any, features: dict[str, Any]) -> Any:
    from sidecar.scoring._st import to_device

    return model(to_device(dict(features), TARGET["device"]))["scores"].float().reshape(-1).cpu().numpy()


# ---- 2. in-process throughput ---------------------------------------------------------------------
def in_process(model_dir: Path, work: list[tuple[str, list[str]]]) -> dict[str, float]:
    """pairs/s of the model alone over all pairs, length-sorted batches of at most 16384 padded tokens."""

    from sidecar.scoring import packing

    pairs = [(q, d) for q, docs in work for d in docs]
    padded = load(model_dir, _low(), "sdpa")
    batches = _batches(padded, pairs, budget=16384)
    figures = {"parameters_m": sum(p.numel() for p in padded.parameters()) / 1e6}  # a check on the shape
    figures["padded_sdpa_pairs_per_s"] = _rate(padded, _padded_scores, batches, len(pairs))
    del padded
    packed = load(model_dir, _low(), TARGET["attention"])
    figures["packed_flash_pairs_per_s"] = _rate(packed, packing.packed_forward, batches, len(pairs))
    del packed
    _free()
    figures["speedup"] = figures["packed_flash_pairs_per_s"] / figures["padded_sdpa_pairs_per_s"]
    return figures


def _batches(model: Any, pairs: list[tuple[str, str]], budget: int) -> list[dict[str, Any]]:
    tok = model.tokenizer
    lengths = [
        len(x)
        for x in tok([q for q, _ in pairs], [d for _, d in pairs], truncation=True, max_length=512)[
            "input_ids"
        ]
    ]
    order = sorted(range(len(pairs)), key=lambda i: -lengths[i])
    out, start = [], 0
    while start < len(order):
        n = max(1, min(len(order) - start, budget // lengths[order[start]]))
        out.append(model.preprocess([pairs[i] for i in order[start : start + n]]))
        start += n
    return out


def _rate(model: Any, run: Any, batches: list[dict[str, Any]], n: int) -> float:
    import torch

    with torch.inference_mode():
        run(model, batches[0])  # warm-up
        _sync()
        t0 = time.perf_counter()
        for f in batches:
            run(model, f)
        _sync()
    return n / (time.perf_counter() - t0)


# ---- 3. end to end --------------------------------------------------------------------------------
def end_to_end(
    model_dir: Path, work: list[tuple[str, list[str]]], args: argparse.Namespace
) -> dict[str, Any]:
    """The served sidecar's pairs/s under `concurrency` clients; also whether its scorer packs batches."""

    from sidecar.client import RerankerClient
    from sidecar.launch import SidecarProcess
    from sidecar.scoring.loading import load_scorer
    from sidecar.settings import Settings

    served = {**TARGET, "attention": "sdpa" if TARGET["device"] == "cpu" else TARGET["attention"]}
    flags = ["--device", served["device"], "--dtype", served["dtype"], "--attention", served["attention"]]
    flags += ["--max-batch-tokens", str(args.max_batch_tokens), "--max-documents", str(args.depth)]
    scorer = load_scorer(Settings.model_validate({"model": str(model_dir), **served}))
    packed = bool(getattr(scorer, "padding_free", False))
    del scorer
    _free()
    with SidecarProcess(["--model", str(model_dir), *flags]) as sc, RerankerClient(sc.grpc_target) as client:
        for q, docs in work[:2]:
            client.rerank(q, docs, timeout=600)
        todo = list(work)
        lock = threading.Lock()
        latencies: list[float] = []

        def worker() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    q, docs = todo.pop()
                t0 = time.perf_counter()
                client.rerank(q, docs, timeout=600)
                with lock:
                    latencies.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    return {
        "pairs_per_s": sum(len(d) for _, d in work) / wall,
        "p50_s": statistics.median(latencies),
        "served_scorer_packs_batches": packed,
    }


def _low() -> Any:
    import torch

    return getattr(torch, TARGET["dtype"])


def _sync() -> None:
    import torch

    if TARGET["device"] == "cuda":
        torch.cuda.synchronize()


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if TARGET["device"] == "cuda":
        torch.cuda.empty_cache()


# ---- pairs ----------------------------------------------------------------------------------------
def natural_pairs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    rng = random.Random(13)
    if args.dataset_dir:
        root = Path(args.dataset_dir)
        corpus = [json.loads(line) for line in (root / "corpus.jsonl").open()]
        texts = [f"{d.get('title', '')} {d['text']}".strip() for d in corpus]
        qs = [json.loads(line)["text"] for line in (root / "queries.jsonl").open()]
        return [(rng.choice(qs), rng.sample(texts, args.depth)) for _ in range(args.queries)]
    from transformers import AutoTokenizer

    from sidecar.model_factory import packaged_embedding_model_dir

    vocab = AutoTokenizer.from_pretrained(str(packaged_embedding_model_dir())).get_vocab()
    words = sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2)

    def text(n: int) -> str:
        return " ".join(rng.choices(words, k=n))

    return [
        (text(rng.randint(6, 14)), [f"{text(rng.randint(1, 6))}. {text(100)}" for _ in range(args.depth)])
        for _ in range(args.queries)
    ]


def _mean_words(work: list[tuple[str, list[str]]]) -> float:
    return statistics.mean(len(q.split()) + len(d.split()) for q, docs in work for d in docs)


def print_row(name: str, row: dict[str, Any]) -> None:
    ip = row["in_process"]
    line = (
        f"{name:24s} {ip['parameters_m']:6.1f}M params; model only: padded+SDPA "
        f"{ip['padded_sdpa_pairs_per_s']:8.0f}  packed+flash "
        f"{ip['packed_flash_pairs_per_s']:8.0f} pairs/s ({ip['speedup']:.2f}x)"
    )
    if "end_to_end" in row:
        e = row["end_to_end"]
        release = row["release_pairs_per_s"]
        packs = "yes" if e["served_scorer_packs_batches"] else "no"
        line += (
            f" | gRPC {e['pairs_per_s']:8.0f} pairs/s = {e['pairs_per_s'] / release:.2f}x the release's "
            f"{release:.0f} (H100); served scorer packs batches: {packs}"
        )
    print(line)


if __name__ == "__main__":
    raise SystemExit(main())
