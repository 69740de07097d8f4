"""Fixtures for the evaluator: tiny BEIR directories written on the fly, SciFact, one cached Lucene index."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.eval import datasets
from sidecar.eval.datasets import Dataset
from tests.conftest import SCIFACT
from tests.eval.beir_helpers import write_beir


@pytest.fixture
def beir_factory(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(**kwargs: object) -> Path:
        return write_beir(tmp_path / f"beir{next(counter)}", **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def tiny(beir_factory: Callable[..., Path]) -> Dataset:
    return datasets.load(beir_factory(), name="tiny")


@pytest.fixture(scope="session")
def scifact_dir() -> Path:
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    return SCIFACT


@pytest.fixture(scope="session")
def scifact(scifact_dir: Path) -> Dataset:
    return datasets.load(scifact_dir, split="test", name="scifact")


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole session, so the SciFact index is built once."""
    return tmp_path_factory.mktemp("rerank-cache")


@pytest.fixture(scope="session")
def scifact_bm25(scifact: Dataset, eval_cache: Path):  # type: ignore[no-untyped-def]
    from sidecar.eval.bm25 import LuceneBm25

    stage = LuceneBm25(scifact, cache_root=eval_cache)
    yield stage
    stage.close()
