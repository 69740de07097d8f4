"""BM25 first stage with pyserini (Lucene): a local index built from the corpus, cached by content hash.

The index reproduces pyserini's BEIR "flat" condition: one `contents` field holding title + newline + text,
Anserini's default English analyzer (Porter stemming, stopwords removed), and BM25 with k1=0.9, b=0.4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.progress import Progress

from sidecar.eval import cache, java_env
from sidecar.eval.datasets import Dataset
from sidecar.eval.first_stage import Hit, advance, progress_task

# Bump when anything that changes the index's content changes (fields, analysis, document order).
_INDEX_FORMAT = "lucene-flat-v1"
_BATCH = 1_000


def corpus_key(dataset: Dataset) -> str:
    """Hash of the indexed content itself (ids, contents and their order), not of the files it came from."""
    parts: list[str] = [_INDEX_FORMAT, java_env.anserini_jar().name]
    for doc_id, doc in dataset.corpus.items():
        parts.append(doc_id)
        parts.append(doc.flat())
    return cache.digest(*parts)


def build_index(dataset: Dataset, cache_root: Path | None = None, progress: Progress | None = None) -> Path:
    """The Lucene index of `dataset`'s corpus, built on first use and reused while the corpus is unchanged."""
    java_env.configure()
    entry = (cache_root or cache.cache_dir()) / "lucene" / f"{dataset.name}-{corpus_key(dataset)}"
    if cache.is_complete(entry):
        return entry
    from pyserini.index.lucene import LuceneIndexer

    docs = list(dataset.corpus.items())
    task = progress_task(progress, f"indexing {dataset.name} (Lucene)", len(docs))
    with cache.building(entry) as scratch:
        # One indexing thread keeps Lucene's internal document order equal to the corpus order, so the way
        # equal BM25 scores are ordered (and so the published figures) does not vary from build to build.
        indexer = LuceneIndexer(str(scratch), threads=1)
        try:
            for i in range(0, len(docs), _BATCH):
                batch = docs[i : i + _BATCH]
                indexer.add_batch_dict([{"id": doc_id, "contents": doc.flat()} for doc_id, doc in batch])
                advance(progress, task, len(batch))
        finally:
            indexer.close()
        (scratch / "rerank-sidecar.json").write_text(
            json.dumps({"dataset": dataset.name, "documents": len(docs), "format": _INDEX_FORMAT})
        )
    return entry


class LuceneBm25:
    name = "bm25"

    def __init__(
        self,
        dataset: Dataset,
        *,
        k1: float = 0.9,
        b: float = 0.4,
        cache_root: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.index_dir = build_index(dataset, cache_root, progress)
        from pyserini.search.lucene import LuceneSearcher

        self.k1, self.b = k1, b
        self._searcher = LuceneSearcher(str(self.index_dir))
        self._searcher.set_bm25(float(k1), float(b))

    def search(self, query: str, k: int) -> list[Hit]:
        if not query.strip():
            return []
        return [Hit(str(h.docid), float(h.score)) for h in self._searcher.search(query, k)]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "bm25",
            "engine": "pyserini/Lucene",
            "k1": self.k1,
            "b": self.b,
            "contents": "flat: title + newline + text",
            "index": str(self.index_dir),
        }

    def stats(self) -> dict[str, Any]:
        from pyserini.index.lucene import LuceneIndexReader

        return dict(LuceneIndexReader(str(self.index_dir)).stats())

    def thread_exit(self) -> None:
        java_env.detach_thread()

    def close(self) -> None:
        self._searcher.close()
