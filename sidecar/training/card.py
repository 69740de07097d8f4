"""The fine-tuned model's card (README.md in the output directory) and its training-curve plot."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.training.finetune import FinetuneConfig, FinetuneReport

_METRICS = ("ndcg@10", "mrr@10", "map@100")


def loss_plot(report: FinetuneReport, path: Path) -> Path | None:
    """Training loss by step and dev nDCG@10 at each evaluation, one figure; None when nothing was logged."""
    if not report.loss_history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        [h["step"] for h in report.loss_history], [h["loss"] for h in report.loss_history], label="train loss"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("BCE loss (pos_weight)")
    evals = [h for h in report.dev_history if h.get("steps", -1) >= 0]
    handles, labels = ax.get_legend_handles_labels()
    if evals:
        ax2 = ax.twinx()
        ax2.plot(
            [h["steps"] for h in evals],
            [h["ndcg@10"] for h in evals],
            "o-",
            color="tab:orange",
            label="dev nDCG@10",
        )
        ax2.axhline(report.dev_before["ndcg@10"], linestyle="--", color="tab:gray", label="dev nDCG@10, BM25")
        ax2.set_ylabel("dev nDCG@10")
        more_handles, more_labels = ax2.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    # One legend below the axes, so it never covers a curve.
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    ax.set_title(f"fine-tuning {Path(report.base).name}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _loss_line(report: FinetuneReport) -> str:
    if report.train_loss_before is None or report.train_loss_after is None:
        return ""
    return (
        f"\nMean loss over the training pairs: {report.train_loss_before:.4f} before training, "
        f"{report.train_loss_after:.4f} after."
    )


def model_card(
    config: FinetuneConfig, report: FinetuneReport, dataset: str, pos_weight: float, plot: Path | None
) -> str:
    m = config.mining
    ex = report.examples
    rows = "\n".join(
        f"| {name} | {report.dev_before[name]:.4f} | {report.dev_after[name]:.4f} | "
        f"{report.dev_after[name] - report.dev_before[name]:+.4f} |"
        for name in _METRICS
    )
    hyper = {k: v for k, v in asdict(config).items() if k not in {"mining", "data", "out", "cache_root"}}
    hyper["base"] = report.base
    hyper_rows = "\n".join(f"| `{k}` | {v} |" for k, v in hyper.items())
    best = (
        f"step {report.best_checkpoint_step}" if report.best_checkpoint_step is not None else "the last step"
    )
    plot_line = f"\n![training loss and dev nDCG@10]({plot.name})\n" if plot else ""
    return f"""---
library_name: sentence-transformers
pipeline_tag: text-ranking
tags: [cross-encoder, reranker, rerank-sidecar]
---

# Cross-encoder reranker fine-tuned on {dataset} (train split)

Fine-tuned from **{report.base}** with `rerank-sidecar finetune`; serve it with
`rerank-sidecar serve --model {config.out}`.

## Training data

- Dataset: `{config.data}` (`{dataset}`), split **train** only. The test split was never read.
- Queries: {report.train_queries} for training, {report.dev_queries} held out as a dev split (seeded
  shuffle of the training queries, fraction {config.dev_fraction}; their ids are in `dev_qids.txt`).
- Pairs: {ex["pairs"]} = {ex["positives"]} positives (qrels) + negatives:
  {ex.get("bm25", 0)} BM25 hard negatives (ranks {m.skip_top + 1}-{m.depth}, top {m.skip_top} skipped),
  {ex.get("embedding", 0)} embedding-model hard negatives, {ex.get("random", 0)} random.
  No negative is ever a document judged relevant to its query.
- Loss: binary cross-entropy on logits with `pos_weight` = negatives per positive = {pos_weight:.2f}.

## Hyper-parameters

| parameter | value |
| --- | --- |
{hyper_rows}
| mining | {asdict(m)} |

Trained on {report.device} in {report.precision}; {report.train_seconds / 60:.1f} min of training,
{report.total_seconds / 60:.1f} min in all. Best dev checkpoint: {best}.{_loss_line(report)}

## Dev evaluation (BM25 top-{config.dev_depth} of the {report.dev_queries} dev queries, reranked)

| metric | BM25 order | reranked | change |
| --- | --- | --- | --- |
{rows}
{plot_line}
These are dev figures from training queries, used to pick the checkpoint; they are not test results.
Test results come from `rerank-sidecar replay --model {config.out}` on the test split.
"""


FUSION_HEADING = "## Score fusion"


def with_fusion_section(card: str, record: dict[str, Any]) -> str:
    """The card with its score-fusion section (what `tune-fusion` chose, and where) added or replaced."""
    from sidecar.fusion import FusionSpec

    on, ndcg = record["chosen_on"], record["ndcg@10"]

    spec = FusionSpec.from_dict(record, where="fusion.json", strict=False).describe()
    section = f"""{FUSION_HEADING}

`fusion.json` holds the fusion chosen by `rerank-sidecar tune-fusion`, **{spec}**: the best
nDCG@10 over {on["queries"]} queries ({on["query_set"]}, split {on["split"]}, {on["first_stage"]})
among no fusion, blend (alpha 0 to 1 by 0.05, min-max and z-score) and RRF. The sidecar applies it by
default (`RERANK_FUSION=auto`).

| ranking of the same candidates | nDCG@10 |
| --- | --- |
| BM25 | {ndcg["first_stage"]:.4f} |
| reranker alone | {ndcg["no_fusion"]:.4f} |
| reranker fused with BM25 (chosen) | {ndcg["chosen"]:.4f} |

![nDCG@10 by blend weight](fusion_tuning.png)
"""
    head, _, tail = card.partition(FUSION_HEADING)
    rest = tail.split("\n## ", 1)[1] if "\n## " in tail else ""
    return head.rstrip() + "\n\n" + section + (("\n## " + rest) if rest else "")
