"""Everything a replay leaves behind: metrics computed from its runs, TREC run files, the JSON result, the
Markdown report, PNG plots, and the summary table printed at the end."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sidecar.eval import metrics as m
from sidecar.eval.datasets import Dataset
from sidecar.eval.replay import ReplayResult

SCHEMA = "rerank-sidecar/replay/v1"
RUN_FIRST_STAGE = "run.first_stage.trec"
RUN_RERANKED = "run.reranked.trec"
RUN_RERANKED_NO_FUSION = "run.reranked_no_fusion.trec"  # written only when the sidecar fused scores
RESULT_JSON = "result.json"
REPORT_MD = "report.md"
LATENCY_PNG = "latency.png"
DELTA_PNG = "ndcg_delta.png"
HEADLINE = "ndcg@10"


def metric_names(hits: int) -> list[str]:
    names = list(m.DEFAULT_METRICS)
    if hits >= 1000:
        names.append("recall@1000")  # pyserini's BEIR tables report it; only meaningful with 1000 hits
    return names


def write_trec_run(path: Path, run: m.Run, tag: str) -> None:
    """TREC run format (`qid Q0 docid rank score tag`); scores are written exactly (shortest round-trip repr),
    so trec_eval on the file reproduces the evaluator's figures to the last digit."""
    with path.open("w") as f:
        for qid, ranking in run.items():
            for rank, (doc_id, score) in enumerate(ranking, 1):
                f.write(f"{qid} Q0 {doc_id} {rank} {score!r} {tag}\n")


def read_trec_run(path: Path) -> m.Run:
    run: m.Run = {}
    for line in path.read_text().splitlines():
        if line.strip():
            qid, _, doc_id, _, score, *_ = line.split()
            run.setdefault(qid, []).append((doc_id, float(score)))
    return run


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, digits)


def build_result(
    dataset: Dataset,
    result: ReplayResult,
    *,
    first_stage: Mapping[str, Any],
    rerank: Mapping[str, Any] | None,
    command: Sequence[str] = (),
    seed: int = 0,
) -> dict[str, Any]:
    """Compute every figure of the replay into one JSON-ready dict (the report and table read only this)."""
    qids = result.qids
    qrels = dataset.qrels_for(qids)
    names = metric_names(result.config.hits)
    fs_run = result.first_stage_run()
    fs_pq = m.evaluate(qrels, fs_run, qids, names)
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": list(command),
        "dataset": {
            "name": dataset.name,
            "path": str(dataset.path),
            "split": dataset.split,
            "queries": len(qids),
            "documents": len(dataset.corpus),
            "warnings": dataset.warnings,
        },
        "first_stage": dict(first_stage),
        "rerank": dict(rerank) if rerank is not None else None,
        "config": {
            "hits": result.config.hits,
            "depth": result.config.depth if result.reranked else 0,
            "concurrency": result.config.concurrency,
            "qps": result.config.qps,
            "warmup": result.config.warmup,
        },
        "metrics": {"first_stage": {k: _round(v) for k, v in m.aggregate(fs_pq).items()}},
        "per_query": {q: {"first_stage": {k: fs_pq[k][q] for k in names}} for q in qids},
    }
    records = list(result.records.values())
    latency: dict[str, Any] = {
        "first_stage": m.latency_summary([r.first_stage_seconds for r in records]),
        "end_to_end": m.latency_summary([r.e2e_seconds for r in records]),
    }
    if result.config.qps:
        latency["start_lag"] = m.latency_summary([r.start_lag_seconds for r in records])
    if result.reranked:
        rr_run, nudged = result.reranked_run()
        rr_pq = m.evaluate(qrels, rr_run, qids, names)
        out["metrics"]["reranked"] = {k: _round(v) for k, v in m.aggregate(rr_pq).items()}
        for q in qids:
            out["per_query"][q]["reranked"] = {k: rr_pq[k][q] for k in names}
        out["comparison"] = _comparisons(fs_pq, rr_pq, names, ("first_stage", "reranked"), seed)
        fusion = _fusion_summary(result, rerank)
        if fusion is not None:
            nf_run, _ = result.reranked_run(unfused=True)
            nf_pq = m.evaluate(qrels, nf_run, qids, names)
            out["metrics"]["reranked_no_fusion"] = {k: _round(v) for k, v in m.aggregate(nf_pq).items()}
            for q in qids:
                out["per_query"][q]["reranked_no_fusion"] = {k: nf_pq[k][q] for k in names}
            # Δ is fused minus unfused: what the fusion adds to the same model's reranking.
            fusion["comparison"] = _comparisons(nf_pq, rr_pq, names, ("reranked_no_fusion", "reranked"), seed)
            out["fusion"] = fusion
        ok = [r for r in records if r.rerank is not None]
        latency["rerank"] = m.latency_summary([r.rerank_seconds for r in ok if r.rerank_seconds is not None])
        for key, attr in (
            ("server_queue", "server_queue_seconds"),
            ("server_inference", "server_inference_seconds"),
            ("server_total", "server_total_seconds"),
        ):
            values = [getattr(r.rerank, attr) for r in ok if getattr(r.rerank, attr) is not None]
            if values:
                latency[key] = m.latency_summary(values)
        errors = result.rerank_errors
        out["errors"] = {
            "rerank_errors": len(errors),
            "examples": dict(list(errors.items())[:5]),
            "fallback_hits": sum(r.rerank.fallback_hits for r in ok if r.rerank),
            "fallback_reasons": sorted({x for r in ok if r.rerank for x in r.rerank.fallback_reasons}),
            "truncated_hits": sum(r.rerank.truncated_hits for r in ok if r.rerank),
            "reranked_hits": sum(len(r.candidates) for r in ok),
            "scores_nudged_for_strict_order": nudged,
        }
    out["latency"] = latency
    out["verdict"] = verdict(out)
    wall = result.wall_seconds
    out["throughput"] = {
        "wall_seconds": _round(wall, 3),
        "queries": len(qids),
        "pairs": result.pairs,
        "queries_per_s": _round(len(qids) / wall if wall > 0 else 0.0, 3),
        "pairs_per_s": _round(result.pairs / wall if wall > 0 else 0.0, 3),
    }
    return out


def _comparisons(
    a: Mapping[str, Mapping[str, float]],
    b: Mapping[str, Mapping[str, float]],
    names: Sequence[str],
    labels: tuple[str, str],
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Per metric: both means under `labels`, Δ (b − a), wins / losses / ties of b, and paired p-values."""
    out = {}
    for k in names:
        c = m.compare(a[k], b[k], k, seed=seed)
        out[k] = {
            labels[0]: _round(c.mean_a),
            labels[1]: _round(c.mean_b),
            "delta": _round(c.delta),
            "wins": c.wins,
            "losses": c.losses,
            "ties": c.ties,
            "t_statistic": _round(c.t_statistic),
            "t_test_p": _round(c.t_p_value),
            "randomization_p": _round(c.randomization_p_value),
            "ci95": [_round(x) for x in c.ci95] if c.ci95 else None,
        }
    return out


SIGNIFICANCE = 0.05


def verdict(summary: Mapping[str, Any], metric: str = HEADLINE) -> str:
    """One line that answers "did reranking help here?": the change of the headline metric with its 95%
    confidence interval and paired t p-value, called significant at p < 0.05, and the model alone beside it
    when the sidecar fused scores."""
    ds = summary["dataset"]
    fs = summary["metrics"]["first_stage"].get(metric)
    if "reranked" not in summary["metrics"] or fs is None:
        return (
            f"Verdict: first stage only ({ds['queries']} queries): {metric} {_fmt(fs)}; nothing was reranked."
        )
    c = summary["comparison"][metric]
    p, delta = c.get("t_test_p"), c["delta"]
    ci = c.get("ci95")
    ci_text = f"95% CI {ci[0]:+.4f} to {ci[1]:+.4f}, " if ci else ""
    if p is not None and p < SIGNIFICANCE:
        call = "a significant gain" if delta > 0 else "a significant loss"
    else:
        call = "no significant change"
    fusion = summary.get("fusion")
    how = f"reranking fused with the first stage ({fusion['applied_name']})" if fusion else "reranking"
    line = (
        f"Verdict: {how} moved {metric} from {fs:.4f} to {c['reranked']:.4f} ({delta:+.4f}, {ci_text}"
        f"paired t p {_p(p)}; {_n(c['wins'], 'query', 'queries')} better, {c['losses']} worse): {call} "
        f"over {ds['queries']} {ds['name']} {ds['split']} queries."
    )
    if fusion:
        alone = summary["metrics"]["reranked_no_fusion"][metric]
        line += f" The model alone, without fusion: {alone:.4f} ({alone - fs:+.4f})."
    return line


def _fusion_name(spec: Mapping[str, Any]) -> str:
    from sidecar.fusion import FusionSpec

    try:
        return FusionSpec.from_dict(spec, strict=False).describe()
    except Exception:  # a server's spelling this client does not know: show it as sent
        return json.dumps(spec, sort_keys=True)


def _fusion_summary(result: ReplayResult, rerank: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What the sidecar reported applying, when it fused at least one query; None when it fused none."""
    answered = [r.rerank for r in result.records.values() if r.rerank is not None]
    fused = [o.fusion for o in answered if o.fused and o.fusion is not None]
    if not fused:
        return None
    counts: dict[str, int] = {}
    by_name: dict[str, dict[str, Any]] = {}
    for spec in fused:
        name = _fusion_name(spec)
        counts[name] = counts.get(name, 0) + 1
        by_name.setdefault(name, spec)
    applied = max(counts, key=lambda n: counts[n])  # one in practice; the most common if the server varied
    requested = (rerank or {}).get("fusion_requested")
    return {
        "requested": dict(requested) if requested else "server default",
        "applied": by_name[applied],
        "applied_name": applied,
        "queries_fused": len(fused),
        # Reranked by the model alone, e.g. a server-default blend on a query without first-stage scores.
        "queries_not_fused": len(answered) - len(fused),
        "by_fusion": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
    }


def write_outputs(
    out_dir: Path, dataset: Dataset, result: ReplayResult, summary: dict[str, Any], *, plots: bool = True
) -> dict[str, str]:
    """Write run files, JSON, Markdown and plots into `out_dir`; returns {kind: file} (also in the JSON)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    fs_tag = f"{summary['first_stage'].get('kind', 'first_stage')}"
    write_trec_run(out_dir / RUN_FIRST_STAGE, result.first_stage_run(), fs_tag)
    files["run_first_stage"] = RUN_FIRST_STAGE
    if result.reranked:
        rr_run, _ = result.reranked_run()
        write_trec_run(out_dir / RUN_RERANKED, rr_run, f"{fs_tag}+rerank")
        files["run_reranked"] = RUN_RERANKED
        if "fusion" in summary:
            nf_run, _ = result.reranked_run(unfused=True)
            write_trec_run(out_dir / RUN_RERANKED_NO_FUSION, nf_run, f"{fs_tag}+rerank-no-fusion")
            files["run_reranked_no_fusion"] = RUN_RERANKED_NO_FUSION
    if plots:
        plot_latency(out_dir / LATENCY_PNG, result)
        files["latency_plot"] = LATENCY_PNG
        if result.reranked:
            plot_delta(out_dir / DELTA_PNG, summary)
            files["ndcg_delta_plot"] = DELTA_PNG
    files["report"] = REPORT_MD
    files["result"] = RESULT_JSON
    summary["files"] = files
    (out_dir / REPORT_MD).write_text(markdown(summary))
    (out_dir / RESULT_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    return files


# ---- plots ---------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    # The object-oriented API with an Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_latency(path: Path, result: ReplayResult) -> None:
    """One row per stage on a shared log axis: the range of its latencies (a thin line from min to max), a
    box from p50 to p95, and marks at p50, p95 and p99 with their values written beside the row.

    Rows instead of overlaid curves: the rerank call, the sidecar's own time and the end-to-end time are
    often within a few percent of each other, and overlaid CDFs then hide one another.
    """
    import numpy as np

    records = list(result.records.values())
    stages = [("first stage", [r.first_stage_seconds for r in records])]
    if result.reranked:
        stages.append(
            ("rerank call (client)", [r.rerank_seconds for r in records if r.rerank and r.rerank_seconds])
        )
        for label, attr in (
            ("sidecar queue", "server_queue_seconds"),
            ("sidecar inference", "server_inference_seconds"),
            ("sidecar total", "server_total_seconds"),
        ):
            values = [getattr(r.rerank, attr) for r in records if r.rerank and getattr(r.rerank, attr)]
            if values:
                stages.append((label, values))
    stages.append(("end to end", [r.e2e_seconds for r in records]))
    rows = []
    for label, values in stages:
        x = np.asarray([v for v in values if v and v > 0], dtype=float) * 1000.0
        if len(x):
            rows.append((label, x))
    from matplotlib.transforms import blended_transform_factory

    height = 1.3 + 0.55 * max(1, len(rows))
    fig = _figure(10, height)
    ax = fig.add_subplot()
    side = blended_transform_factory(ax.transAxes, ax.transData)
    for i, (_, x) in enumerate(reversed(rows)):
        p50, p95, p99 = np.percentile(x, [50, 95, 99])
        ax.hlines(i, x.min(), x.max(), color="#888888", linewidth=1)
        ax.barh(i, p95 - p50, left=p50, height=0.45, color="#4c72b0", alpha=0.35)
        ax.plot([p50], [i], "o", color="#1f3b73", markersize=6)
        ax.plot([p95], [i], "s", color="#c0392b", markersize=5)
        ax.plot([p99], [i], "^", color="#7d3c98", markersize=6)
        # The values in a column right of the axes, where no mark can cover them.
        ax.text(
            1.02,
            i,
            f"p50 {p50:,.1f} · p95 {p95:,.1f} · p99 {p99:,.1f} ms",
            transform=side,
            va="center",
            fontsize=8,
        )
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)])
    ax.set_xscale("log")
    lo = min(float(x.min()) for _, x in rows) if rows else 1.0
    hi = max(float(x.max()) for _, x in rows) if rows else 10.0
    ax.set_xlim(lo / 1.5, hi * 1.5)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("latency (ms, log scale): line = min..max, box = p50..p95; ● p50  ■ p95  ▲ p99")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    cfg = result.config
    load = f"{cfg.qps:g} qps offered" if cfg.qps else f"concurrency {cfg.concurrency}"
    ax.set_title(f"Latency per stage ({len(records)} queries, {load})", fontsize=10)
    # Fixed margins (not tight_layout, which would count the value column as part of the axes).
    fig.subplots_adjust(left=0.17, right=0.68, bottom=0.7 / height, top=1 - 0.45 / height)
    fig.savefig(path)


def plot_delta(path: Path, summary: Mapping[str, Any], metric: str = HEADLINE) -> None:
    """Per-query change of `metric` (reranked minus first stage), sorted, wins green and losses red."""
    per_query = summary["per_query"]
    deltas = sorted(
        (v["reranked"][metric] - v["first_stage"][metric] for v in per_query.values() if "reranked" in v),
        reverse=True,
    )
    c = summary["comparison"][metric]
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    colors = ["#2a9d4b" if d > 1e-9 else "#c0392b" if d < -1e-9 else "#999999" for d in deltas]
    ax.bar(range(len(deltas)), deltas, width=1.0, color=colors)
    ax.axhline(0, color="black", linewidth=0.8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("queries, sorted by change")
    ax.set_ylabel(f"Δ {metric} (reranked − first stage)")
    ax.set_title(
        f"Per-query {metric}: {c['wins']} better, {c['losses']} worse, {c['ties']} unchanged; "
        f"mean Δ {c['delta']:+.4f}",
        fontsize=10,
    )
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


# ---- text ----------------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _describe(d: Mapping[str, Any] | None, keys: Sequence[str]) -> str:
    if not d:
        return "none"
    return ", ".join(f"{k} {d[k]}" for k in keys if d.get(k) not in (None, ""))


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _share(part: int, whole: int | None) -> str:
    if not whole:
        return str(part)
    return f"{part} of {whole} reranked hits ({100 * part / whole:.1f}%)"


def _p(x: float | None) -> str:
    return "—" if x is None else ("< 0.0001" if x < 1e-4 else f"{x:.4f}")


def latency_rows(summary: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    labels = {
        "first_stage": "first stage",
        "rerank": "rerank call (client)",
        "server_queue": "  sidecar queue",
        "server_inference": "  sidecar inference",
        "server_total": "  sidecar total",
        "end_to_end": "end to end",
        "start_lag": "start lag (open loop)",
    }
    lat = summary["latency"]
    return [(labels[k], lat[k]) for k in labels if k in lat and lat[k].get("count")]


_FS_KEYS = ("kind", "engine", "k1", "b", "contents", "model", "search", "url", "index", "query")
_RR_KEYS = (
    "api",
    "model_id",
    "backend",
    "device",
    "dtype",
    "instruction",
    "target",
    "url",
    "pipeline",
    "sidecar_calls",
    "sidecar_mean_ms",
)


def markdown(summary: Mapping[str, Any]) -> str:
    ds, cfg = summary["dataset"], summary["config"]
    reranked = "reranked" in summary["metrics"]
    fs, rr = summary["first_stage"], summary.get("rerank")
    lines = [
        f"# Replay: {ds['name']} ({ds['split']}, {ds['queries']} queries, {ds['documents']} documents)",
        "",
        f"**{summary.get('verdict') or verdict(summary)}**",
        "",
        f"- first stage: {_describe(fs, _FS_KEYS)}",
        f"- rerank: {_describe(rr, _RR_KEYS)}",
        f"- depth {cfg['depth']} (hits reranked per query), first-stage hits {cfg['hits']}, "
        + (f"offered load {cfg['qps']} queries/s" if cfg.get("qps") else f"concurrency {cfg['concurrency']}")
        + f", warm-up {cfg['warmup']} queries",
        f"- command: `{' '.join(summary.get('command') or [])}`",
        "",
        "## Quality",
        "",
    ]
    names = list(summary["metrics"]["first_stage"])
    fusion = summary.get("fusion")
    if reranked:
        rr_label = "reranked (fused)" if fusion else "reranked"
        lines += _comparison_table("first stage", rr_label, summary["comparison"], "first_stage", names)
        lines += [
            "",
            "Significance: two-sided paired tests over queries (Student t, and a sign-flip randomization "
            "test with a fixed seed); a small p-value means the difference is unlikely to be chance.",
        ]
        if fusion:
            lines += ["", *_fusion_markdown(fusion, names)]
    else:
        lines += ["| metric | first stage |", "| --- | ---: |"]
        lines += [f"| {k} | {_fmt(summary['metrics']['first_stage'][k])} |" for k in names]
    lines += [
        "",
        "## Latency",
        "",
        "| stage | p50 ms | p95 ms | p99 ms | mean ms | max ms | n |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, s in latency_rows(summary):
        lines.append(
            f"| {label.strip()} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['p99_ms']:.1f} | "
            f"{s['mean_ms']:.1f} | "
            f"{s['max_ms']:.1f} | {s['count']} |"
        )
    t = summary["throughput"]
    lines += [
        "",
        f"Throughput: {t['queries_per_s']:.2f} queries/s, {t['pairs_per_s']:.1f} pairs/s "
        f"({t['queries']} queries, {t['pairs']} pairs in {t['wall_seconds']:.1f} s).",
        "",
    ]
    errors = summary.get("errors")
    if errors:
        lines += [
            "## Errors and fallbacks",
            "",
            f"- rerank calls that failed (query kept its first-stage order): {errors['rerank_errors']}",
            f"- hits the sidecar returned in fallback order: {errors['fallback_hits']}"
            + (f" ({', '.join(errors['fallback_reasons'])})" if errors["fallback_reasons"] else ""),
            "- hits truncated to the model's length: "
            + _share(errors["truncated_hits"], errors.get("reranked_hits")),
            "",
        ]
        for q, e in errors["examples"].items():
            lines.append(f"  - query {q}: {e}")
    files = summary.get("files", {})
    if files.get("latency_plot") or files.get("ndcg_delta_plot"):
        lines += ["## Plots", ""]
        if files.get("latency_plot"):
            lines += [f"![latency per stage]({files['latency_plot']})", ""]
        if files.get("ndcg_delta_plot"):
            lines += [f"![per-query nDCG@10 change]({files['ndcg_delta_plot']})", ""]
    lines += ["## Files", ""] + [f"- {k}: `{v}`" for k, v in files.items()] + [""]
    return "\n".join(lines)


def _fusion_line(fusion: Mapping[str, Any]) -> str:
    requested, applied = fusion["requested"], fusion["applied_name"]
    if isinstance(requested, str):
        source = "the sidecar's default"
    else:
        asked = _fusion_name(requested)
        source = "as requested" if asked == applied else f"requested: {asked}"
    line = (
        f"{applied} on {fusion['queries_fused']} of "
        f"{fusion['queries_fused'] + fusion['queries_not_fused']} reranked queries ({source})"
    )
    others = [f"{n} on {c}" for n, c in fusion["by_fusion"].items() if n != fusion["applied_name"]]
    return line + (f"; also {', '.join(others)}" if others else "")


def _fusion_markdown(fusion: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    lines = [
        "### Score fusion",
        "",
        f"The sidecar fused its scores with the first stage's: {_fusion_line(fusion)}. "
        "*Reranked, no fusion* ranks the same candidates of the same replay by the model's raw score "
        f"(`{RUN_RERANKED_NO_FUSION}`); Δ is fused minus no fusion.",
        "",
    ]
    return lines + _comparison_table(
        "reranked, no fusion", "reranked (fused)", fusion["comparison"], "reranked_no_fusion", names
    )


def _comparison_table(
    label_a: str, label_b: str, comparisons: Mapping[str, Any], key_a: str, names: Sequence[str]
) -> list[str]:
    """A Markdown table of paired comparisons, B (`reranked`) against A (`key_a`), one row per metric."""
    lines = [
        f"| metric | {label_a} | {label_b} | Δ | wins / losses / ties | paired t p | randomization p |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k in names:
        c = comparisons[k]
        lines.append(
            f"| {k} | {_fmt(c[key_a])} | {_fmt(c['reranked'])} | {c['delta']:+.4f} | "
            f"{c['wins']} / {c['losses']} / {c['ties']} | {_p(c['t_test_p'])} | {_p(c['randomization_p'])} |"
        )
    return lines


def print_summary(summary: Mapping[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    ds = summary["dataset"]
    reranked = "reranked" in summary["metrics"]
    title = f"{ds['name']} {ds['split']}: {ds['queries']} queries"
    rr = summary.get("rerank") or {}
    fs_label = summary["first_stage"].get("kind", "first stage")
    fusion = summary.get("fusion")
    console.print(f"[bold]{title}[/]", highlight=False)
    # One line whatever the terminal's width: scripts and CI logs grep for it.
    console.print(f"[bold]{summary.get('verdict') or verdict(summary)}[/]", highlight=False, soft_wrap=True)
    if reranked:
        console.print(
            f"reranker: {rr.get('model_id') or '?'} ({rr.get('backend') or rr.get('api', '')}) via "
            f"{rr.get('api')}, depth {summary['config']['depth']}"
            + (f", fusion {fusion['applied_name']}" if fusion else ""),
            highlight=False,
            soft_wrap=True,
        )
    table = Table()
    table.add_column("metric")
    table.add_column(fs_label, justify="right")
    if reranked:
        table.add_column("reranked (fused)" if fusion else "reranked", justify="right")
        table.add_column("Δ", justify="right")
        table.add_column("W/L/T", justify="right")
        table.add_column("p (t / rand.)", justify="right")
    for k, v in summary["metrics"]["first_stage"].items():
        if reranked:
            c = summary["comparison"][k]
            table.add_row(
                k,
                _fmt(v),
                _fmt(c["reranked"]),
                f"{c['delta']:+.4f}",
                f"{c['wins']}/{c['losses']}/{c['ties']}",
                f"{_p(c['t_test_p'])} / {_p(c['randomization_p'])}",
            )
        else:
            table.add_row(k, _fmt(v))
    console.print(table)
    if fusion:
        # A second table: fused vs unfused is its own comparison (Δ, wins and p-values against no fusion).
        console.print(
            f"fusion: {_fusion_line(fusion)}; fused vs the model alone:", highlight=False, soft_wrap=True
        )
        ft = Table()
        for col in ("metric", "no fusion", "fused", "Δ", "W/L/T", "p (t / rand.)"):
            ft.add_column(col, justify="left" if col == "metric" else "right")
        for k, c in fusion["comparison"].items():
            ft.add_row(
                k,
                _fmt(c["reranked_no_fusion"]),
                _fmt(c["reranked"]),
                f"{c['delta']:+.4f}",
                f"{c['wins']}/{c['losses']}/{c['ties']}",
                f"{_p(c['t_test_p'])} / {_p(c['randomization_p'])}",
            )
        console.print(ft)
    lat = Table()
    for col in ("latency (ms)", "p50", "p95", "p99", "mean"):
        lat.add_column(col, justify="left" if col.startswith("latency") else "right")
    for label, s in latency_rows(summary):
        lat.add_row(
            label, f"{s['p50_ms']:.1f}", f"{s['p95_ms']:.1f}", f"{s['p99_ms']:.1f}", f"{s['mean_ms']:.1f}"
        )
    console.print(lat)
    t = summary["throughput"]
    console.print(
        f"throughput: {t['queries_per_s']:.2f} queries/s, {t['pairs_per_s']:.1f} pairs/s "
        f"({t['pairs']} pairs in {t['wall_seconds']:.1f} s)"
    )
    errors = summary.get("errors") or {}
    if errors.get("rerank_errors"):
        console.print(
            f"[bold red]{errors['rerank_errors']} rerank calls failed[/]; "
            "those queries kept their first-stage order"
        )
    if errors.get("fallback_hits"):
        console.print(f"[yellow]{errors['fallback_hits']} hits came back in fallback order[/]")
    if errors.get("truncated_hits"):
        console.print(
            f"hits truncated to the model's length: "
            f"{_share(errors['truncated_hits'], errors.get('reranked_hits'))}",
            highlight=False,
        )
