"""Realistic (query, document) text for tests: SciFact when the shared data is beside the repo, else
a built-in handful of varied-length passages."""

from __future__ import annotations

import json
from pathlib import Path

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "beir" / "scifact"

_FALLBACK_DOCS = [
    "Vaccines train the immune system to recognise a pathogen.",
    "The stock market fell sharply today after the announcement. " * 3,
    "Immunization with an attenuated virus elicits neutralising antibodies in most recipients. " * 6,
    "Cats.",
    "Protein folding is driven by the hydrophobic effect and stabilised by hydrogen bonds. " * 12,
]
_FALLBACK_QUERIES = ["how do vaccines work", "what drives protein folding", "market crash"]


def documents(n: int = 24) -> list[str]:
    if (SCIFACT / "corpus.jsonl").exists():
        out = []
        with (SCIFACT / "corpus.jsonl").open() as fh:
            for line in fh:
                d = json.loads(line)
                out.append(f"{d['title']} {d['text']}")
                if len(out) >= n:
                    break
        # Vary lengths: cut some documents short so batches mix long and short pairs.
        return [d if i % 3 else d[: 40 + 13 * i] for i, d in enumerate(out)]
    return [_FALLBACK_DOCS[i % len(_FALLBACK_DOCS)] + f" #{i}" for i in range(n)]


def queries(n: int = 3) -> list[str]:
    if (SCIFACT / "queries.jsonl").exists():
        with (SCIFACT / "queries.jsonl").open() as fh:
            return [json.loads(line)["text"] for _, line in zip(range(n), fh, strict=False)]
    return _FALLBACK_QUERIES[:n]
