"""`rerank-sidecar finetune` and `rerank-sidecar tune-fusion`, registered into the main CLI.

Registration imports nothing heavy; torch, sentence-transformers and pyserini load in the handlers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training data (BEIR layout; only qrels/train.tsv is read)")
    g.add_argument(
        "--data",
        "--dataset-dir",
        dest="data",
        default=None,
        help="a BEIR directory with corpus.jsonl, queries.jsonl and qrels/train.tsv; wins over --dataset",
    )
    g.add_argument(
        "--dataset",
        default=None,
        help="BEIR dataset name (default scifact): a local copy under ../shared/data/beir or the cache, "
        "else downloaded",
    )
    g.add_argument("--cache-dir", default=None, help="cache for datasets, indexes and embeddings")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a cross-encoder reranker on a BEIR training split (BCE, mined hard negatives)",
        description=(
            "Train a cross-encoder on the train split of a BEIR collection: positives from qrels/train.tsv, "
            "hard negatives mined from BM25 (skipping the top ranks and anything judged relevant), random "
            "negatives, binary cross-entropy with pos_weight = negatives per positive. A dev split "
            "carved from the training queries picks the best checkpoint. The output directory is servable "
            "with `rerank-sidecar serve --model OUT` and holds a model card. Unless --no-tune-fusion, "
            "the blend weight for score fusion is then chosen on the dev queries, next to the model."
        ),
    )
    _add_data_arguments(p)
    p.add_argument("--out", required=True, help="output directory (the servable model)")
    p.add_argument(
        "--base",
        default=None,
        help="encoder to start from: a directory or hub id (default: the packaged all-MiniLM-L6-v2 weights "
        "with a fresh 1-label head)",
    )
    p.add_argument(
        "--head",
        choices=("auto", "mean", "classifier"),
        default="auto",
        help="fresh head: mean pooling + Dense (auto for sentence-transformers embedding models, which were "
        "trained to mean-pool) or the Hugging Face CLS classifier (auto for other encoders)",
    )
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--learning-rate", type=float, default=1e-4)
    t.add_argument("--warmup-ratio", type=float, default=0.1)
    t.add_argument("--max-length", type=int, default=192, help="tokens per (query, document) pair")
    t.add_argument("--seed", type=int, default=12)
    t.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="auto: bf16 on CUDA and on CPUs with native bf16 (AMX/AVX512-BF16), float32 elsewhere",
    )
    t.add_argument(
        "--max-train-queries", type=int, default=None, help="use only the first N training queries"
    )
    t.add_argument(
        "--measure-train-loss",
        action="store_true",
        help="report the mean loss over the training pairs before and after training (two extra passes)",
    )
    t.add_argument(
        "--keep-checkpoints", action="store_true", help="keep the trainer's checkpoints/ directory"
    )
    d = p.add_argument_group("dev split (carved from the training queries)")
    d.add_argument("--dev-fraction", type=float, default=0.1)
    d.add_argument(
        "--dev-depth", type=int, default=20, help="BM25 hits per dev query to rerank in evaluation"
    )
    d.add_argument("--evals-per-epoch", type=int, default=2)
    m = p.add_argument_group("negative mining")
    m.add_argument("--mine-depth", type=int, default=30, help="BM25 (and embedding) hits to mine from")
    m.add_argument("--skip-top", type=int, default=3, help="never take negatives from the first N ranks")
    m.add_argument("--hard-negatives", type=int, default=3, help="BM25 hard negatives per query")
    m.add_argument(
        "--embedding-negatives",
        type=int,
        default=0,
        help="hard negatives per query from the embedding model (default 0: off)",
    )
    m.add_argument("--embedding-model", default=None, help="embedding model for mining (default: packaged)")
    m.add_argument("--random-negatives", type=int, default=1, help="random corpus negatives per query")
    f = p.add_argument_group("fusion weights")
    f.add_argument("--no-tune-fusion", action="store_true", help="do not choose a blend weight afterwards")
    f.add_argument("--fusion-depth", type=int, default=100, help="BM25 hits per dev query when tuning fusion")
    p.set_defaults(func=finetune_command)

    p = subparsers.add_parser(
        "tune-fusion",
        help="choose the score-fusion blend weight on training/dev queries and write fusion.json",
        description=(
            "Replay training-split queries (the model's dev queries when it has dev_qids.txt, else the whole "
            "train split) through BM25 and a sidecar serving --model, then grid-search the fusion method, "
            "normalisation and alpha for the best nDCG@10 and write fusion.json next to the model (or to "
            "--out). The test split is never read."
        ),
    )
    _add_data_arguments(p)
    p.add_argument("--model", default=None, help="model directory (default: the packaged embedding model)")
    p.add_argument(
        "--out",
        default=None,
        help="directory for fusion.json and its plot, or a *.json file path (default: the model directory)",
    )
    p.add_argument("--depth", type=int, default=100, help="BM25 hits per query to rerank")
    p.add_argument("--max-queries", type=int, default=None, help="use only the first N queries")
    p.add_argument(
        "--all-train",
        action="store_true",
        help="use every train-split query even when the model has dev_qids.txt (only for models that never "
        "trained on this split, such as an off-the-shelf embedding model)",
    )
    p.add_argument("--concurrency", type=int, default=4)
    p.set_defaults(func=tune_fusion_command)


def _resolve_data(args: argparse.Namespace) -> Path:
    from sidecar.eval import cache, datasets

    if args.cache_dir:
        cache.use_dir(args.cache_dir)  # also where the index and embeddings go: no cache_root to pass on
    path, _ = datasets.resolve(args.data, args.dataset)
    return path


def finetune_command(args: argparse.Namespace) -> int:
    import logging

    from rich.console import Console

    from sidecar.eval.datasets import DatasetError
    from sidecar.progress import progress_display
    from sidecar.training.finetune import FinetuneConfig, finetune
    from sidecar.training.mining import MiningConfig

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=True)
    try:
        config = FinetuneConfig(
            data=_resolve_data(args),
            out=Path(args.out).expanduser(),
            base=args.base,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            warmup_ratio=args.warmup_ratio,
            max_length=args.max_length,
            seed=args.seed,
            dev_fraction=args.dev_fraction,
            dev_depth=args.dev_depth,
            max_train_queries=args.max_train_queries,
            evals_per_epoch=args.evals_per_epoch,
            precision=args.precision,
            head=args.head,
            mining=MiningConfig(
                depth=args.mine_depth,
                skip_top=args.skip_top,
                hard_negatives=args.hard_negatives,
                embedding_negatives=args.embedding_negatives,
                random_negatives=args.random_negatives,
            ),
            embedding_model=args.embedding_model,
            keep_checkpoints=args.keep_checkpoints,
            measure_train_loss=args.measure_train_loss,
        )
    except (ValueError, DatasetError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    with progress_display(console) as progress:
        report = finetune(
            config, progress=progress, on_status=lambda m: console.print(f"[bold]finetune:[/] {m}")
        )
    console.print(f"[bold]saved[/] {report.out} (model card: {report.out / 'README.md'})")
    for name in report.dev_before:
        console.print(
            f"  dev {name}: BM25 {report.dev_before[name]:.4f} -> reranked {report.dev_after[name]:.4f}"
        )
    if report.train_loss_before is not None and report.train_loss_after is not None:
        console.print(f"  training loss: {report.train_loss_before:.4f} -> {report.train_loss_after:.4f}")
    console.print(
        f"  training {report.train_seconds / 60:.1f} min, total {report.total_seconds / 60:.1f} min"
    )
    if args.no_tune_fusion:
        return 0
    from sidecar.training.fusion_tuning import tune_fusion

    tune_fusion(
        model=report.out,
        data=config.data,
        depth=args.fusion_depth,
        console=console,
    )
    return 0


def tune_fusion_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sidecar.eval.datasets import DatasetError
    from sidecar.training.fusion_tuning import FusionTuningError, tune_fusion

    console = Console(stderr=True)
    try:
        tune_fusion(
            model=Path(args.model).expanduser() if args.model else None,
            data=_resolve_data(args),
            depth=args.depth,
            out=Path(args.out).expanduser() if args.out else None,
            max_queries=args.max_queries,
            all_train=args.all_train,
            concurrency=args.concurrency,
            console=console,
        )
    except (FusionTuningError, DatasetError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    return 0
