"""Tiny BEIR collections written on the fly, for the evaluator's tests."""

from __future__ import annotations

import json
from pathlib import Path

# A five-document collection small enough to reason about by hand: each query has one obvious answer.
TINY_CORPUS: list[dict[str, object]] = [
    {"_id": "d1", "title": "Cats", "text": "Cats are small carnivorous mammals kept as pets."},
    {"_id": "d2", "title": "Dogs", "text": "Dogs are loyal companions and bark at strangers."},
    {
        "_id": "d3",
        "title": "Photosynthesis",
        "text": "Plants turn sunlight, water and carbon dioxide into sugar.",
    },
    {"_id": "d4", "title": "Volcanoes", "text": "A volcano erupts when magma rises through the crust."},
    {"_id": "d5", "title": "", "text": "The stock market fell sharply after the interest rate decision."},
]
TINY_QUERIES: list[dict[str, object]] = [
    {"_id": "q1", "text": "why do dogs bark"},
    {"_id": "q2", "text": "how do plants make sugar from sunlight"},
    {"_id": "q3", "text": "what happens when magma rises"},
    {"_id": "q4", "text": "an unjudged query", "metadata": {}},
]
TINY_QRELS: list[tuple[str, str, int]] = [("q1", "d2", 1), ("q2", "d3", 1), ("q3", "d4", 2), ("q3", "d1", 0)]


def write_beir(
    root: Path,
    corpus: list[dict[str, object]] = TINY_CORPUS,
    queries: list[dict[str, object]] = TINY_QUERIES,
    qrels: list[tuple[str, str, int]] = TINY_QRELS,
    split: str = "test",
    newline: str = "\n",
) -> Path:
    """Write a BEIR directory with the given line ending (bytes, so CRLF really is CRLF on disk)."""
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_bytes("".join(json.dumps(d) + newline for d in corpus).encode())
    (root / "queries.jsonl").write_bytes("".join(json.dumps(q) + newline for q in queries).encode())
    lines = ["query-id\tcorpus-id\tscore", *(f"{q}\t{d}\t{r}" for q, d, r in qrels)]
    (root / "qrels" / f"{split}.tsv").write_bytes("".join(line + newline for line in lines).encode())
    return root
