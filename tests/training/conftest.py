"""Fixtures for fine-tuning: a slice of SciFact's train split small enough to index and train on quickly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
