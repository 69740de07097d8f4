"""The quality guard: what each runtime x precision costs in ranking quality, measured on real queries.

For every configuration (torch float32 is the reference) the same BM25 top-`depth` pairs of a BEIR split are
scored through the sidecar's own scorer (`load_scorer`), ranked by the model alone (no fusion) and judged by
trec_eval's nDCG@10 (`sidecar.eval.metrics`). A configuration passes when it loses at most `THRESHOLD`
nDCG@10 against the reference on average and a loss beyond `BOUND_THRESHOLD` is ruled out with one-sided
90% confidence (paired over queries: the mean change minus `CONFIDENCE_Z` standard errors);
`sidecar.scoring.auto_runtime` then lets `--dtype auto` pick only among
configurations that passed. The record is JSON (see `run_guard`), written under the export cache's guard/
folder, keyed by the model's content hash, or wherever `--out` says.

Records measured on a test split are reports, not choices: they are written only to `--out`, and `auto`
ignores them (choosing a precision on the queries it is then judged on would flatter it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from sidecar.scoring.auto_runtime import (
    BOUND_THRESHOLD,
    RECORD_FORMAT,
    THRESHOLD,
    default_export_cache_dir,
    record_path,
    runtimes_available,
)
from sidecar.scoring.runtimes import CASCADE_FIRST_PASSES, CONFIGS

log = logging.getLogger(__name__)

BATCH_PAIRS = 32  # pairs per scorer call, as the batcher would send them
# A configuration passes when its mean change in nDCG@10 is above -THRESHOLD and a loss beyond
# BOUND_THRESHOLD is ruled out with one-sided 90% confidence: the mean change, paired over queries, minus
# this many standard errors. A precision that shuffles rankings (int8) moves single queries a lot, and on a
# few dozen queries its mean alone can look harmless by chance: on a fine-tuned cross-encoder, OpenVINO
# int8+bf16 gained 0.0002 on 81 held-out train queries (bound -0.0143) and lost 0.0132 on 100 test
# queries (docs/quality-guard.md).
CONFIDENCE_Z = 1.2816
EMBEDDING_CACHE_BYTES = 512 << 20


@dataclass(frozen=True)
class GuardConfig:
    runtime: str  # torch | openvino | onnxruntime
    dtype: str  # float32 | bfloat16 (the precision of what is not quantised)
    quantize: str  # none | int8

    @property
    def precision(self) -> str:
        """The shared precision names: float32, bfloat16, int8, int8+bfloat16; torch int8 = int8-dynamic."""
        from sidecar.scoring.runtimes import precision_name

        return precision_name(self.runtime, self.dtype, self.quantize)

    @property
    def key(self) -> str:
        return f"{self.runtime}/{self.precision}"


REFERENCE = GuardConfig("torch", "float32", "none")
ALL_CONFIGS: tuple[GuardConfig, ...] = tuple(GuardConfig(*c) for c in CONFIGS.values())
# Cascades the guard judges from the scores it measured (cross-encoders): documents re-scored per query.
CASCADE_DEPTHS = (10, 20)
_BY_KEY = {c.key: c for c in ALL_CONFIGS}


def default_configs(native_bf16: bool, runtimes: set[str]) -> list[GuardConfig]:
    """Every known configuration this machine can run at speed (bf16 only where the CPU computes it)."""
    return [c for c in ALL_CONFIGS if c.runtime in runtimes and (native_bf16 or c.dtype != "bfloat16")]


def parse_configs(spec: str) -> list[GuardConfig]:
    """`torch/float32,openvino/int8,...`; the reference is always measured, first."""
    out = [REFERENCE]
    for part in spec.split(","):
        key = part.strip()
        if not key:
            continue
        if key not in _BY_KEY:
            raise ValueError(f"unknown configuration {key!r}; known: {', '.join(_BY_KEY)}")
        if _BY_KEY[key] not in out:
            out.append(_BY_KEY[key])
    return out


def settings_for(model: str | None, config: GuardConfig, **extra: Any):  # type: ignore[no-untyped-def]
    """The sidecar settings that load `config` on the CPU."""
    from sidecar.settings import Settings

    fields: dict[str, Any] = {
        "model": model,
        "runtime": config.runtime,
        "device": "cpu",
        "dtype": config.dtype,
        "quantize": config.quantize,
        # A bi-encoder embeds each document once per configuration, as it does when serving; every
        # configuration sees the same cache behaviour, so their speeds stay comparable.
        "embedding_cache_bytes": EMBEDDING_CACHE_BYTES,
        **extra,
    }
    return Settings(**fields)


# ---- the pairs --------------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """BM25 top-`depth` documents per query of a split: what every configuration scores."""

    dataset: str
    split: str
    depth: int
    qids: list[str]
    doc_ids: dict[str, list[str]]
    pairs: dict[str, list[tuple[str, str]]]
    qrels: dict[str, dict[str, int]]
    bm25_scores: dict[str, list[float]]

    @property
    def n_pairs(self) -> int:
        return sum(len(v) for v in self.pairs.values())


def bm25_candidates(
    dataset_dir: Path,
    split: str,
    queries: int | None,
    depth: int,
    *,
    cache_root: Path | None = None,
    progress: Any = None,
    only: Sequence[str] | None = None,
) -> Candidates:
    """`only`: these query ids (judged in the split), before `queries` takes the first N."""
    from sidecar.eval import datasets
    from sidecar.eval.bm25 import LuceneBm25

    data = datasets.load(dataset_dir, split=split)
    qids = data.query_ids()
    if only is not None:
        wanted = set(only)
        missing = wanted - set(qids)
        if missing:
            raise ValueError(
                f"{len(missing)} of the {len(wanted)} query ids given are not judged in split {split!r} "
                f"(e.g. {sorted(missing)[0]})"
            )
        qids = [q for q in qids if q in wanted]
    qids = qids[:queries] if queries else qids
    bm25 = LuceneBm25(data, cache_root=cache_root, progress=progress)
    try:
        hits = {q: bm25.search(data.queries[q], depth) for q in qids}
    finally:
        bm25.close()
    return Candidates(
        dataset=data.name,
        split=split,
        depth=depth,
        qids=qids,
        doc_ids={q: [h.doc_id for h in hits[q]] for q in qids},
        pairs={q: [(data.queries[q], data.corpus[h.doc_id].joined()) for h in hits[q]] for q in qids},
        qrels=data.qrels_for(qids),
        bm25_scores={q: [h.score for h in hits[q]] for q in qids},
    )


# ---- scoring and judging ----------------------------------------------------------------------------------


@dataclass
class Scored:
    config: GuardConfig
    scores: dict[str, np.ndarray]
    seconds: float  # in the scorer's score() calls only
    pairs: int
    dtype_reported: str  # what the scorer says it runs (ModelInfo.dtype)


def score_config(
    model: str | None,
    config: GuardConfig,
    cands: Candidates,
    *,
    progress: Any = None,
    settings_extra: dict[str, Any] | None = None,
) -> Scored:
    import numpy as np

    from sidecar.scoring.base import Pair
    from sidecar.scoring.loading import load_scorer

    scorer = load_scorer(settings_for(model, config, **(settings_extra or {})))
    first = cands.pairs[cands.qids[0]][:2] if cands.qids else []
    if first:
        scorer.score([Pair(q, d) for q, d in first])  # warm-up, not timed
    task = progress.add_task(f"guard {config.key}", total=cands.n_pairs) if progress is not None else None
    scores: dict[str, np.ndarray] = {}
    seconds = 0.0
    for q in cands.qids:
        pairs = [Pair(a, b) for a, b in cands.pairs[q]]
        parts = []
        for i in range(0, len(pairs), BATCH_PAIRS):
            t0 = time.perf_counter()
            parts.append(np.asarray(scorer.score(pairs[i : i + BATCH_PAIRS]), dtype=np.float32))
            seconds += time.perf_counter() - t0
            if task is not None:
                progress.advance(task, len(pairs[i : i + BATCH_PAIRS]))
        scores[q] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return Scored(config, scores, seconds, cands.n_pairs, scorer.info.dtype)


def ndcg10_per_query(cands: Candidates, scores: dict[str, np.ndarray]) -> np.ndarray:
    """nDCG@10 of the model-alone ranking (scores descending, ties in BM25 order) per query of
    `cands.qids`, via trec_eval."""
    import numpy as np

    from sidecar.eval.metrics import evaluate_scored_per_query

    scored = {q: (cands.doc_ids[q], [float(s) for s in scores[q]]) for q in cands.qids}
    per_query = evaluate_scored_per_query(cands.qrels, scored, ["ndcg@10"])["ndcg@10"]
    return np.array([per_query.get(q, 0.0) for q in cands.qids], dtype=np.float64)


def ndcg10(cands: Candidates, scores: dict[str, np.ndarray]) -> float:
    """Mean nDCG@10 of the model-alone ranking."""
    return float(ndcg10_per_query(cands, scores).mean()) if cands.qids else 0.0


def change_bound(per_query_delta: np.ndarray) -> tuple[float, float, float]:
    """Mean change, its standard error (paired over queries) and the one-sided lower confidence bound
    (`CONFIDENCE_Z` standard errors below the mean) that the pass rule holds against -THRESHOLD."""
    import numpy as np

    n = len(per_query_delta)
    mean = float(per_query_delta.mean()) if n else 0.0
    se = float(per_query_delta.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return mean, se, mean - CONFIDENCE_Z * se


def _top10(scores: np.ndarray) -> list[int]:
    import numpy as np

    return [int(i) for i in np.argsort(-scores, kind="stable")[:10]]


def compare(cands: Candidates, ref: Scored, got: Scored, ref_per_query: np.ndarray) -> dict[str, Any]:
    import numpy as np

    per_query = ndcg10_per_query(cands, got.scores)
    ndcg = float(per_query.mean())
    delta, se, lower = change_bound(per_query - ref_per_query)
    diffs = [float(np.max(np.abs(got.scores[q] - ref.scores[q]))) for q in cands.qids if len(ref.scores[q])]
    order_kept = [_top10(got.scores[q]) == _top10(ref.scores[q]) for q in cands.qids]
    overlap = [
        len(set(_top10(got.scores[q])) & set(_top10(ref.scores[q]))) / max(1, min(10, len(ref.scores[q])))
        for q in cands.qids
    ]
    c = got.config
    return {
        "runtime": c.runtime,
        "dtype": c.dtype,
        "quantize": c.quantize,
        "precision": c.precision,
        "reported_dtype": got.dtype_reported,
        "ndcg@10": round(ndcg, 6),
        "delta": round(delta, 6),
        "delta_se": round(se, 6),
        "delta_lower": round(lower, 6),
        "max_abs_diff": round(max(diffs, default=0.0), 6),
        "top10_order_kept": round(float(np.mean(order_kept)) if order_kept else 1.0, 4),
        "top10_set_overlap": round(float(np.mean(overlap)) if overlap else 1.0, 4),
        "pairs_per_s": round(got.pairs / got.seconds, 2) if got.seconds > 0 else None,
        # Rounded the way it is recorded, so a reader recomputing from the record gets the same verdict.
        "passed": bool(round(delta, 6) >= -THRESHOLD and round(lower, 6) >= -BOUND_THRESHOLD),
    }


def cascade_rows(
    cands: Candidates,
    ref: Scored,
    ref_per_query: np.ndarray,
    measured: Sequence[tuple[Scored, dict[str, Any]]],
    depths: Sequence[int] = CASCADE_DEPTHS,
) -> list[dict[str, Any]]:
    """Rows for cascades (settings.cascade) built from what was measured: every int8 first pass of an
    exported runtime, then the top `depth` per query re-scored by the fastest configuration that passed
    without int8, and by torch float32. Each query's ranking is what serving returns: the first pass's
    scores, the top `depth` of them (stable order) replaced by the served precision's. Its pairs/s is
    estimated from the two passes' measured speeds: one pass over every pair, plus `depth`/`cands.depth`
    of a pass; a cascade no faster than its served precision alone is left out.
    """
    import numpy as np

    unquantized = [
        (g, r) for g, r in measured if r["passed"] and r["pairs_per_s"] and g.config.quantize == "none"
    ]
    if not unquantized:
        return []
    fastest = max(unquantized, key=lambda gr: float(gr[1]["pairs_per_s"]))
    served = [fastest] + [(g, r) for g, r in unquantized if g.config == REFERENCE and g is not fastest[0]]
    rows = []
    for first, first_row in measured:
        if (
            first.config.quantize != "int8"
            or first.config.key not in CASCADE_FIRST_PASSES
            or not first_row["pairs_per_s"]
        ):
            continue
        for precise, precise_row in served:
            for depth in depths:
                if depth >= cands.depth:
                    continue
                share = depth / cands.depth
                per_pair = 1 / float(first_row["pairs_per_s"]) + share / float(precise_row["pairs_per_s"])
                if per_pair * float(precise_row["pairs_per_s"]) >= 1:
                    continue  # no faster than the served precision alone
                merged = {}
                for q in cands.qids:
                    scores = first.scores[q].copy()
                    top = np.argsort(-scores, kind="stable")[:depth]
                    scores[top] = precise.scores[q][top]
                    merged[q] = scores
                got = Scored(
                    precise.config, merged, per_pair * cands.n_pairs, cands.n_pairs, precise.dtype_reported
                )
                row = compare(cands, ref, got, ref_per_query)
                row["cascade"] = {
                    "runtime": first.config.runtime,
                    "dtype": first.config.dtype,
                    "quantize": first.config.quantize,
                    "precision": first.config.precision,
                    "depth": depth,
                }
                row["pairs_per_s_estimated"] = True
                rows.append(row)
    return rows


def row_label(row: dict[str, Any]) -> str:
    """`openvino/int8`, or for a cascade `openvino/int8 > top 20 openvino/bfloat16`."""
    name = f"{row['runtime']}/{row['precision']}"
    first = row.get("cascade")
    if first:
        return f"{first['runtime']}/{first['precision']} > top {first['depth']} {name}"
    return name


def unmeasured(config: GuardConfig, error: str) -> dict[str, Any]:
    """The row of a configuration that failed to load or run: failed, with the reason."""
    return {
        "runtime": config.runtime,
        "dtype": config.dtype,
        "quantize": config.quantize,
        "precision": config.precision,
        "ndcg@10": None,
        "delta": None,
        "max_abs_diff": None,
        "top10_order_kept": None,
        "top10_set_overlap": None,
        "pairs_per_s": None,
        "passed": False,
        "error": error,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_guard(
    model: str | None,
    dataset_dir: Path,
    *,
    split: str = "train",
    queries: int | None = None,
    depth: int = 100,
    configs: Sequence[GuardConfig] | None = None,
    cache_root: Path | None = None,
    progress: Any = None,
    settings_extra: dict[str, Any] | None = None,
    scores_out: dict[str, Any] | None = None,
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Measure every configuration on the same pairs; the record (a JSON-able dict).

    `{"format", "model": {id, revision, backend}, "dataset": {name, split, queries, depth, first_stage},
    "threshold", "baseline": {runtime, precision, ndcg@10}, "first_stage_ndcg@10", "machine",
    "configs": [{runtime, dtype, quantize, precision, ndcg@10, delta, max_abs_diff, top10_order_kept,
    top10_set_overlap, pairs_per_s, passed}, ...], "created"}`; the first config is the reference.
    For a cross-encoder, cascade rows follow (`cascade_rows`): the same fields for the served precision,
    plus `cascade` (the first pass and its depth) and `pairs_per_s_estimated`.
    `scores_out`, when given, receives the candidates (`"candidates"`) and each configuration's scores per
    query (under its key), for a caller that wants to check the figures from the scores themselves.
    """
    import numpy as np

    from sidecar.scoring.device import cpu_has_native_bf16
    from sidecar.scoring.loading import detect_backend, resolve_source

    chosen = list(configs) if configs else default_configs(cpu_has_native_bf16(), runtimes_available())
    if chosen[0] != REFERENCE:
        chosen = [REFERENCE] + [c for c in chosen if c != REFERENCE]
    from sidecar.scoring.runtimes import model_content_id

    source = resolve_source(model, None)
    backend = detect_backend(source)
    cands = bm25_candidates(
        dataset_dir, split, queries, depth, cache_root=cache_root, progress=progress, only=only
    )
    if not cands.qids:
        raise ValueError(f"{dataset_dir}: no judged queries in split {split!r}")
    ref = score_config(model, REFERENCE, cands, progress=progress, settings_extra=settings_extra)
    ref_per_query = ndcg10_per_query(cands, ref.scores)
    ref_ndcg = float(ref_per_query.mean())
    rows = [compare(cands, ref, ref, ref_per_query)]
    measured: list[tuple[Scored, dict[str, Any]]] = [(ref, rows[0])]
    if scores_out is not None:
        scores_out["candidates"] = cands
        scores_out[REFERENCE.key] = ref.scores
    for config in chosen[1:]:
        try:
            got = score_config(model, config, cands, progress=progress, settings_extra=settings_extra)
        except Exception as exc:  # a configuration that cannot run is recorded as failed, not fatal
            log.warning("guard: %s could not be measured: %s", config.key, exc)
            rows.append(unmeasured(config, f"{type(exc).__name__}: {exc}"))
            continue
        rows.append(compare(cands, ref, got, ref_per_query))
        measured.append((got, rows[-1]))
        if scores_out is not None:
            scores_out[config.key] = got.scores
    if backend == "cross-encoder":
        rows += cascade_rows(cands, ref, ref_per_query, measured)
    bm25 = {q: np.asarray(cands.bm25_scores[q], dtype=np.float32) for q in cands.qids}
    return {
        "format": RECORD_FORMAT,
        "model": {"id": source.model_id, "revision": model_content_id(source), "backend": backend},
        "dataset": {
            "name": cands.dataset,
            "split": split,
            "queries": len(cands.qids),
            "query_selection": "the ids given (--query-ids)" if only is not None else "first judged",
            "depth": depth,
            "pairs": cands.n_pairs,
            "first_stage": "BM25 (pyserini/Lucene, flat, k1=0.9 b=0.4)",
            "ranking": "model alone (no fusion)",
            "speed": f"pairs/s in the scorer, batches of {BATCH_PAIRS}; a bi-encoder embeds each document "
            "once per configuration (its embedding cache, as served)",
        },
        "threshold": THRESHOLD,
        "bound_threshold": BOUND_THRESHOLD,
        "confidence_z": CONFIDENCE_Z,
        "baseline": {"runtime": "torch", "precision": "float32", "ndcg@10": round(ref_ndcg, 6)},
        "first_stage_ndcg@10": round(ndcg10(cands, bm25), 6),
        "machine": {
            "cpu": _cpu_name(),
            "native_bf16": cpu_has_native_bf16(),
            "cores": os.cpu_count(),
        },
        "configs": rows,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


# ---- where records live -----------------------------------------------------------------------------------


def write_record(record: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def summary_lines(record: dict[str, Any]) -> list[str]:
    ds = record["dataset"]
    width = max([26, *(len(row_label(r)) for r in record["configs"])])
    lines = [
        f"guard: {record['model']['id']} ({record['model']['revision']}), {ds['name']} {ds['split']}, "
        f"{ds['queries']} queries x BM25 top-{ds['depth']} ({ds['pairs']} pairs); BM25 alone nDCG@10 "
        f"{record['first_stage_ndcg@10']:.4f}; pass = lose at most {record['threshold']} nDCG@10 on "
        f"average, and bound (one-sided 90% lower bound of the change, paired over queries) at least "
        f"-{record.get('bound_threshold', BOUND_THRESHOLD)}",
        f"{'config':<{width}} {'nDCG@10':>8} {'delta':>8} {'bound':>8} {'max|diff|':>10} {'top10 order':>11} "
        f"{'top10 set':>9} {'pairs/s':>8}  verdict",
    ]
    for r in record["configs"]:
        if r.get("error"):
            lines.append(f"{row_label(r):<{width}} not measured: {r['error']}")
            continue
        pps = f"{r['pairs_per_s']:.1f}" if r["pairs_per_s"] is not None else "-"
        if r.get("pairs_per_s_estimated"):
            pps += "*"
        lines.append(
            f"{row_label(r):<{width}} {r['ndcg@10']:>8.4f} {r['delta']:>+8.4f} "
            f"{r.get('delta_lower', r['delta']):>+8.4f} "
            f"{r['max_abs_diff']:>10.4f} {r['top10_order_kept']:>11.2f} {r['top10_set_overlap']:>9.2f} "
            f"{pps:>8}  {'pass' if r['passed'] else 'FAIL'}"
        )
    if any(r.get("pairs_per_s_estimated") for r in record["configs"]):
        lines.append(
            "* a cascade's pairs/s is estimated from its two passes' measured speeds; its rankings are "
            "what serving returns (first pass, then the top re-scored)"
        )
    return lines


# ---- CLI --------------------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "guard",
        help="measure what each runtime x precision costs in nDCG@10 against torch float32; `auto` obeys it",
        description=(
            "Score the BM25 top-DEPTH documents of a BEIR split's queries with the model in every runtime x "
            "precision this machine offers (torch float32 is the reference), rank by the model alone and "
            f"report nDCG@10, its change, max |score diff|, top-10 agreement and pairs/s. A configuration "
            f"passes when it loses at most {THRESHOLD} nDCG@10 on average and a loss beyond "
            f"{BOUND_THRESHOLD} is ruled out with one-sided 90% confidence (paired over queries). The "
            "record goes to the export cache, keyed "
            "by the model's content hash, where `--dtype auto` reads it (train/dev splits only: a test-split "
            "record is a report and needs --out)."
        ),
    )
    p.add_argument("--model", default=None, help="model directory or hub id (default: the packaged model)")
    p.add_argument("--dataset-dir", "--data", dest="dataset_dir", default=None, help="a BEIR directory")
    p.add_argument("--dataset", default=None, help="BEIR dataset name (default scifact), found locally")
    p.add_argument("--split", default="train", help="qrels split to measure on (default train)")
    p.add_argument("--queries", type=int, default=None, help="only the first N judged queries")
    p.add_argument(
        "--query-ids",
        default=None,
        help="a file of query ids (one per line) to measure on, e.g. a fine-tuned model's dev_qids.txt: "
        "training queries the model never trained on",
    )
    p.add_argument("--depth", type=int, default=100, help="BM25 documents per query (default 100)")
    p.add_argument(
        "--configs",
        default=None,
        help="comma-separated RUNTIME/PRECISION keys (default: all this machine offers): "
        + ", ".join(_BY_KEY),
    )
    p.add_argument("--out", default=None, help="write the record here (default: the export cache)")
    p.add_argument("--cache-dir", default=None, help="cache for datasets and the BM25 index")
    p.set_defaults(func=guard_command)


def _read_ids(path: str) -> list[str]:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--query-ids {path}: cannot read it ({exc.strerror})") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"--query-ids {path} holds no query ids")
    return ids


def guard_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sidecar.cli import UserError
    from sidecar.eval import cache, datasets
    from sidecar.progress import progress_display
    from sidecar.scoring.loading import ModelLoadError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=True)
    if args.queries is not None and args.queries < 1:
        raise UserError("--queries must be at least 1", 2)
    if args.depth < 10:
        raise UserError("--depth must be at least 10 (nDCG@10 needs ten documents)", 2)
    if args.split == "test" and not args.out:
        raise UserError(
            "a test-split record is a report, not a choice (auto would pick on the queries it is judged "
            "on): pass --out FILE, or measure on --split train",
            2,
        )
    try:
        configs = parse_configs(args.configs) if args.configs else None
        if configs:
            have = runtimes_available()
            missing = sorted({c.runtime for c in configs} - have)
            if missing:
                raise UserError(f"runtime(s) {', '.join(missing)} not available in this installation", 2)
        if args.cache_dir:
            cache.use_dir(args.cache_dir)
        path, _ = datasets.resolve(args.dataset_dir, args.dataset, download_ok=args.dataset_dir is None)
        with progress_display(console) as progress:
            record = run_guard(
                args.model,
                path,
                split=args.split,
                queries=args.queries,
                depth=args.depth,
                configs=configs,
                progress=progress,
                only=_read_ids(args.query_ids) if args.query_ids else None,
            )
    except (ValueError, datasets.DatasetError, ModelLoadError) as exc:
        raise UserError(str(exc), 2) from None
    record["command"] = "rerank-sidecar " + " ".join(sys.argv[1:])
    out = (
        Path(args.out).expanduser()
        if args.out
        else record_path(default_export_cache_dir(), record["model"]["revision"])
    )
    write_record(record, out)
    for line in summary_lines(record):
        print(line)
    print(f"record: {out}")
    return 0
