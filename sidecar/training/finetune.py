"""Fine-tune a cross-encoder reranker on a BEIR training split, the sentence-transformers v4+ way.

The recipe: positives from `qrels/train.tsv`, hard negatives mined from BM25 (and optionally the embedding
model), a few random negatives, binary cross-entropy with `pos_weight` = negatives per positive, the
`CrossEncoderTrainer`, a dev split carved from the training queries for per-epoch evaluation and choice of the
best checkpoint. The output directory is what `rerank-sidecar serve --model DIR` loads, with a model card
(README.md) and `training.json` describing the data, hyper-parameters and dev results.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress

from sidecar.eval import datasets as beir
from sidecar.training.evaluation import DevQuery, DevRerankEvaluator
from sidecar.training.mining import MiningConfig, as_columns, mine, split_dev

log = logging.getLogger(__name__)

DEV_QIDS_FILE = "dev_qids.txt"
TRAINING_FILE = "training.json"
HEADS = ("auto", "mean", "classifier")


@dataclass(frozen=True)
class FinetuneConfig:
    data: Path
    out: Path
    base: str | None = None  # None: the packaged all-MiniLM-L6-v2 encoder with a fresh 1-label head
    epochs: float = 1.0
    batch_size: int = 16
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 192
    seed: int = 12
    dev_fraction: float = 0.1
    dev_depth: int = 20
    max_train_queries: int | None = None
    evals_per_epoch: int = 2
    logging_steps: int | None = None
    precision: str = "auto"  # auto | float32 | bfloat16
    head: str = "auto"  # auto | mean | classifier (see load_base)
    mining: MiningConfig = field(default_factory=MiningConfig)
    embedding_model: str | None = None  # for embedding-mined negatives; None: the packaged model
    keep_checkpoints: bool = False
    # One extra pass over the training pairs before and after training, to report the loss on the same data.
    measure_train_loss: bool = False
    cache_root: Path | None = None

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("epochs, batch size and learning rate must be positive")
        if self.dev_depth < 1 or self.evals_per_epoch < 1 or self.max_length < 16:
            raise ValueError("dev depth and evals per epoch must be at least 1, max length at least 16")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {self.head!r}")
        if self.precision not in {"auto", "float32", "bfloat16"}:
            raise ValueError(f"precision must be auto, float32 or bfloat16, not {self.precision!r}")


@dataclass
class FinetuneReport:
    out: Path
    base: str
    train_queries: int
    dev_queries: int
    examples: dict[str, int]
    dev_before: dict[str, float]
    dev_after: dict[str, float]
    dev_history: list[dict[str, Any]]
    loss_history: list[dict[str, float]]
    best_checkpoint_step: int | None
    train_loss_before: float | None
    train_loss_after: float | None
    train_seconds: float
    total_seconds: float
    precision: str
    device: str


def choose_precision(requested: str) -> tuple[str, str]:
    """(device, dtype) for training: bf16 on CUDA with bf16 and on CPUs with native bf16, else float32."""
    import torch

    from sidecar.scoring.device import cpu_has_native_bf16

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if requested != "auto":
        return device, requested
    if device == "cuda":
        return device, "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return device, "bfloat16" if cpu_has_native_bf16() else "float32"


def base_source(base: str | None) -> tuple[str, str]:
    """(path or hub id to load, name for the model card)."""
    if base is None:
        from sidecar.model_factory import PACKAGED_MODEL_NAME, packaged_embedding_model_dir

        return str(packaged_embedding_model_dir()), f"{PACKAGED_MODEL_NAME} (packaged encoder weights)"
    path = Path(base).expanduser()
    return (str(path.resolve()), str(path.resolve())) if path.is_dir() else (base, base)


def is_embedding_model(path: str) -> bool:
    """A local sentence-transformers embedding model (modules.json with a Pooling module), not a reranker."""
    root = Path(path)
    modules, st_config = root / "modules.json", root / "config_sentence_transformers.json"
    if not modules.is_file():
        return False
    if st_config.is_file() and json.loads(st_config.read_text()).get("model_type") == "CrossEncoder":
        return False
    return any("Pooling" in m.get("type", "") for m in json.loads(modules.read_text()))


def load_base(
    base: str | None, max_length: int, seed: int, device: str, head: str = "auto"
) -> tuple[Any, str]:
    """A 1-label CrossEncoder from any encoder, with a freshly initialised (seeded) head; an existing
    reranker continues training with its own head.

    Heads: `mean` is mean pooling over the pair's tokens then Dense(dim -> 1), a modular sentence-transformers
    head (the Ettin shape, with mean instead of CLS pooling); `classifier` is Hugging Face's
    sequence-classification head on the CLS token. `auto` takes `mean` for sentence-transformers embedding
    models, which were trained to mean-pool (their CLS vector was never trained to summarise the input), and
    `classifier` for anything else.
    """
    import transformers
    from sentence_transformers import CrossEncoder

    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    path, name = base_source(base)
    transformers.set_seed(seed)
    local = Path(path).is_dir()
    if head == "mean" or (head == "auto" and local and is_embedding_model(path)):
        import torch
        from sentence_transformers.cross_encoder.modules import Dense, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling

        encoder = Transformer(path, max_seq_length=max_length, model_kwargs={"local_files_only": local})
        dim = encoder.get_embedding_dimension()
        modules = [
            encoder,
            Pooling(dim, pooling_mode="mean"),
            Dense(dim, 1, activation_function=torch.nn.Identity(), module_output_name="scores"),
        ]
        return CrossEncoder(modules=modules, device=device), f"{name}, mean-pooling head"
    model = CrossEncoder(path, num_labels=1, max_length=max_length, device=device, local_files_only=local)
    return model, f"{name}, classification head"


def finetune(
    config: FinetuneConfig,
    *,
    progress: Progress | None = None,
    show_bars: bool = True,
    on_status: Callable[[str], None] = lambda message: None,
) -> FinetuneReport:
    import datasets as hf_datasets
    import torch
    from sentence_transformers.cross_encoder import (
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    from sidecar.eval.bm25 import LuceneBm25

    started = time.perf_counter()
    data = beir.load(config.data, split="train")
    qids = data.query_ids(config.max_train_queries)
    train_qids, dev_qids = split_dev(qids, config.dev_fraction, config.seed)
    on_status(
        f"{data.name}: {len(train_qids)} training and {len(dev_qids)} dev queries (from the train split)"
    )

    bm25 = LuceneBm25(data, cache_root=config.cache_root, progress=progress)
    embedding_stage = None
    if config.mining.embedding_negatives:
        from sidecar.eval.dense import DenseExact

        embedding_stage = DenseExact(
            data, model=config.embedding_model, cache_root=config.cache_root, progress=progress
        )
    try:
        mined = mine(
            data,
            train_qids,
            bm25,
            config.mining,
            seed=config.seed,
            embedding_stage=embedding_stage,
            progress=progress,
        )
        dev = [
            DevQuery(
                q,
                data.queries[q],
                [
                    (h.doc_id, data.corpus[h.doc_id].joined(), h.score)
                    for h in bm25.search(data.queries[q], config.dev_depth)
                ],
            )
            for q in dev_qids
        ]
    finally:
        bm25.close()
    if mined.positives == 0:
        raise ValueError(f"{config.data}: no training query has a relevant document in the corpus")
    pos_weight = mined.negatives_per_positive()
    sources = ", ".join(f"{k} {v}" for k, v in mined.counts.items() if k != "qrels")
    on_status(
        f"{len(mined.examples)} pairs: {mined.positives} positives, {mined.negatives} negatives ({sources}); "
        f"pos_weight {pos_weight:.2f}"
    )

    device, dtype = choose_precision(config.precision)
    model, base_name = load_base(config.base, config.max_length, config.seed, device, config.head)
    train_dataset = hf_datasets.Dataset.from_dict(as_columns(mined, data))
    loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(pos_weight))
    evaluator = DevRerankEvaluator(dev, data.qrels_for(dev_qids), batch_size=max(32, config.batch_size))
    dev_before = evaluator.first_stage_metrics()

    steps_per_epoch = math.ceil(len(train_dataset) / config.batch_size)
    eval_steps = max(1, steps_per_epoch // config.evals_per_epoch)
    checkpoints = config.out / "checkpoints"
    args = CrossEncoderTrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_ratio=config.warmup_ratio,
        weight_decay=config.weight_decay,
        seed=config.seed,
        data_seed=config.seed,
        bf16=dtype == "bfloat16",
        use_cpu=device == "cpu",
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_dev_ndcg@10",
        greater_is_better=True,
        logging_steps=config.logging_steps or max(1, steps_per_epoch // 20),
        logging_first_step=True,
        report_to="none",
        disable_tqdm=not show_bars,
        dataloader_num_workers=0,
    )
    trainer = CrossEncoderTrainer(
        model=model, args=args, train_dataset=train_dataset, loss=loss, evaluator=evaluator
    )
    on_status(
        f"training {base_name} on {device} ({dtype}): {config.epochs:g} epoch(s) x {steps_per_epoch} steps, "
        f"batch {config.batch_size}, dev evaluation every {eval_steps} steps"
    )
    columns = train_dataset.to_dict()
    loss_before = dataset_loss(loss, columns, config.batch_size) if config.measure_train_loss else None
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    loss_after = dataset_loss(loss, columns, config.batch_size) if config.measure_train_loss else None

    best_step = _checkpoint_step(trainer.state.best_model_checkpoint)
    # The trainer reloaded the best checkpoint, whose dev evaluation is already in the history; evaluate again
    # only when it is not (no evaluation happened at that step).
    dev_after = next((dict(h) for h in evaluator.history if h["steps"] == best_step), None)
    if dev_after is None:
        evaluator.show_progress_bar = show_bars
        dev_after = evaluator.metrics_for(evaluator.rerank_scores(trainer.model))
    dev_after = {k: float(dev_after[k]) for k in evaluator.first_stage_metrics()}
    config.out.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(str(config.out))
    if not config.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)

    report = FinetuneReport(
        out=config.out,
        base=base_name,
        train_queries=len(train_qids),
        dev_queries=len(dev_qids),
        examples={"pairs": len(mined.examples), "positives": mined.positives, **mined.counts},
        dev_before=dev_before,
        dev_after=dev_after,
        dev_history=list(evaluator.history),
        loss_history=[
            {"step": float(h["step"]), "loss": float(h["loss"])}
            for h in trainer.state.log_history
            if "loss" in h
        ],
        best_checkpoint_step=best_step,
        train_loss_before=loss_before,
        train_loss_after=loss_after,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started,
        precision=dtype,
        device=device,
    )
    _write_outputs(config, report, dev_qids, data.name, pos_weight)
    return report


def dataset_loss(loss: Any, columns: dict[str, list[Any]], batch_size: int) -> float:
    """Mean loss over every training pair (evaluation mode, no gradient): the same data before and after."""
    import torch

    model = loss.model
    was_training = model.training
    model.eval()
    total, n = 0.0, len(columns["label"])
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                labels = torch.tensor(columns["label"][i : i + batch_size], dtype=torch.float32)
                inputs = [columns["query"][i : i + batch_size], columns["document"][i : i + batch_size]]
                total += float(loss(inputs, labels.to(model.device))) * len(labels)
    finally:
        model.train(was_training)
    return total / max(1, n)


def _checkpoint_step(path: str | None) -> int | None:
    if not path:
        return None
    try:
        return int(Path(path).name.rsplit("-", 1)[-1])
    except ValueError:
        return None


def _write_outputs(
    config: FinetuneConfig, report: FinetuneReport, dev_qids: list[str], dataset: str, pos_weight: float
) -> None:
    from sidecar.training.card import loss_plot, model_card

    out = config.out
    (out / DEV_QIDS_FILE).write_text("".join(f"{q}\n" for q in dev_qids))
    record = {
        "dataset": {"name": dataset, "path": str(config.data), "split": "train"},
        "config": {
            **{k: v for k, v in asdict(config).items() if k not in {"mining", "data", "out", "cache_root"}},
            "mining": asdict(config.mining),
            "loss": "BinaryCrossEntropyLoss",
            "pos_weight": round(pos_weight, 4),
        },
        "report": {k: v for k, v in asdict(report).items() if k != "out"},
    }
    (out / TRAINING_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    plot = loss_plot(report, out / "training_curves.png")
    (out / "README.md").write_text(model_card(config, report, dataset, pos_weight, plot))


def read_dev_qids(model_dir: Path) -> list[str] | None:
    """The dev queries a fine-tuned model was selected on (written by `finetune`), if any."""
    f = model_dir / DEV_QIDS_FILE
    return [line.strip() for line in f.read_text().splitlines() if line.strip()] if f.is_file() else None
