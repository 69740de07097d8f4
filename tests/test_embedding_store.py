"""The bi-encoder's on-disk document embeddings: a second scorer (a restarted sidecar) on the same directory
embeds no document again and gives identical scores; another precision or length never reads them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sidecar.scoring.base import Pair
from tests.conftest import make_scorer
from tests.texts import documents, queries


def _count_embedded(scorer) -> list[str]:  # type: ignore[no-untyped-def]
    """Record every text that reaches the model's forward pass (the scorer itself is real)."""
    seen: list[str] = []
    real = scorer._embed

    def embed(texts, encodings=None):  # type: ignore[no-untyped-def]
        seen.extend(texts)
        return real(texts, encodings)

    scorer._embed = embed
    return seen


def test_restarted_scorer_reads_document_embeddings_from_disk(tmp_path: Path) -> None:
    store = tmp_path / "embeddings"
    pairs = [Pair(q, d) for q in queries(2) for d in documents(6)]
    docs = {p.document for p in pairs}

    first = make_scorer(None, embedding_cache_dir=str(store))
    first_seen = _count_embedded(first)
    before = first.score(pairs)
    assert docs <= set(first_seen)
    files = list(store.glob("*.sqlite"))
    assert len(files) == 1 and first.info.revision.split(":")[-1] in files[0].name

    again = make_scorer(None, embedding_cache_dir=str(store))
    seen = _count_embedded(again)
    after = again.score(pairs)
    assert not docs & set(seen), "a stored document went through the model again"
    assert set(seen) == {p.query for p in pairs}  # queries are always embedded: they differ per request
    np.testing.assert_array_equal(after, before)

    # Another precision is another file: bf16 vectors are never served to a float32 scorer or back.
    make_scorer(None, embedding_cache_dir=str(store), dtype="bfloat16").score(pairs[:1])
    assert len(list(store.glob("*.sqlite"))) == 2


def test_store_works_without_the_memory_cache(tmp_path: Path) -> None:
    pairs = [Pair("vaccines", d) for d in documents(3)]
    a = make_scorer(None, embedding_cache_dir=str(tmp_path), embedding_cache_bytes=0)
    ref = a.score(pairs)
    b = make_scorer(None, embedding_cache_dir=str(tmp_path), embedding_cache_bytes=0)
    seen = _count_embedded(b)
    np.testing.assert_array_equal(b.score(pairs), ref)
    assert seen == ["vaccines"]
