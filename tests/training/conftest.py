"""Fixtures for fine-tuning: a slice of SciFact's train split small enough to index and train on quickly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.model_factory import build_bert_cross_encoder
from tests.conftest import SCIFACT

SLICE_QUERIES = 16
SLICE_EXTRA_DOCS = 600


@pytest.fixture(scope="session")
def scifact_train_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SCIFACT / "qrels" / "train.tsv").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    return write_train_slice(tmp_path_factory.mktemp("scifact-train-slice"))


def write_train_slice(root: Path) -> Path:
    """The first 16 judged train queries, their relevant documents and the first 600 other documents.

    Real SciFact text and judgments (BEIR layout, only qrels/train.tsv), so BM25 mining and training see the
    real thing at a size a CI run can afford.
    """
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    rows = [line.split("\t") for line in (SCIFACT / "qrels" / "train.tsv").read_text().splitlines()[1:]]
    qids: list[str] = []
    for q, _, _ in rows:
        if q not in qids:
            qids.append(q)
    qids = qids[:SLICE_QUERIES]
    kept = [r for r in rows if r[0] in qids]
    relevant = {d for _, d, _ in kept}
    docs = []
    with (SCIFACT / "corpus.jsonl").open() as f:
        for i, line in enumerate(f):
            doc = json.loads(line)
            if doc["_id"] in relevant or i < SLICE_EXTRA_DOCS:
                docs.append(line)
    (root / "corpus.jsonl").write_text("".join(docs))
    with (SCIFACT / "queries.jsonl").open() as f:
        queries = [line for line in f if json.loads(line)["_id"] in set(qids)]
    (root / "queries.jsonl").write_text("".join(queries))
    (root / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in kept)
    )
    return root


@pytest.fixture(scope="session")
def training_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("training-cache")


# One tiny fine-tuning run for every test that needs a fine-tuned cross-encoder (the finetune tests,
# the quality guard on a fine-tuned model).
@pytest.fixture(scope="session")
def finetuned(
    scifact_train_slice: Path, training_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    base = build_bert_cross_encoder(tmp_path_factory.mktemp("base") / "tiny", max_length=128, seed=5)
    out = tmp_path_factory.mktemp("finetuned") / "model"
    code = main(
        [
            "finetune",
            "--data", str(scifact_train_slice),
            "--base", str(base),
            "--out", str(out),
            "--epochs", "6",
            "--batch-size", "8",
            "--learning-rate", "1e-3",
            "--max-length", "96",
            "--dev-fraction", "0.25",
            "--dev-depth", "10",
            "--mine-depth", "20",
            "--skip-top", "2",
            "--hard-negatives", "2",
            "--random-negatives", "1",
            "--fusion-depth", "10",
            "--measure-train-loss",
            # Pinned: 'auto' trains in bf16 on CPUs with native bf16, and the loss figures below must not
            # depend on which CPU runs the tests.
            "--precision", "float32",
            "--cache-dir", str(training_cache),
        ]
    )  # fmt: skip
    assert code == 0
    return out
