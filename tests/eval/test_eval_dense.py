"""Dense first stage with the packaged all-MiniLM-L6-v2: exact inner-product search, the embedding cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sidecar.eval import cache
from sidecar.eval.datasets import Dataset
from sidecar.eval.dense import DenseExact, model_fingerprint, packaged_model_dir

pytestmark = pytest.mark.slow


def test_dense_search_is_exact_and_cached(tiny: Dataset, tmp_path: Path) -> None:
    stage = DenseExact(tiny, cache_root=tmp_path, device="cpu")
    # Each query's obvious answer comes first.
    assert stage.search(tiny.queries["q1"], 3)[0].doc_id == "d2"
    assert stage.search(tiny.queries["q2"], 3)[0].doc_id == "d3"
    assert stage.search(tiny.queries["q3"], 3)[0].doc_id == "d4"

    # Exact: the same ranking and scores as a brute-force cosine over freshly encoded texts.
    texts = [tiny.corpus[d].joined() for d in tiny.corpus]
    emb = stage.model.encode(texts, normalize_embeddings=True)
    q = stage.model.encode([tiny.queries["q2"]], normalize_embeddings=True)[0]
    brute = emb @ q
    hits = stage.search(tiny.queries["q2"], 10)
    assert len(hits) == len(tiny.corpus)
    assert [h.doc_id for h in hits] == [list(tiny.corpus)[i] for i in np.argsort(-brute, kind="stable")]
    assert [h.score for h in hits] == pytest.approx(sorted(brute.tolist(), reverse=True), abs=1e-5)
    assert stage.describe()["dimensions"] == 384

    # A second instance reuses the cached matrix instead of re-encoding.
    assert cache.is_complete(stage.cache_entry)
    stamp = (stage.cache_entry / "embeddings.npy").stat().st_mtime_ns
    again = DenseExact(tiny, cache_root=tmp_path, device="cpu")
    assert again.cache_entry == stage.cache_entry
    assert (stage.cache_entry / "embeddings.npy").stat().st_mtime_ns == stamp
    assert np.array_equal(again.embeddings, stage.embeddings)


def test_model_fingerprint_follows_content(tmp_path: Path) -> None:
    assert model_fingerprint("org/name") == "name:org/name"
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    first = model_fingerprint(model)
    (model / "config.json").write_text('{"changed": 1}')
    assert model_fingerprint(model) != first
    assert len(model_fingerprint(packaged_model_dir())) == 20
