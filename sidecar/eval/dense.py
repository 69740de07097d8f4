"""Dense first stage: a sentence-transformers embedding model and exact inner-product search.

Corpus embeddings are cached under a key made of the model's files and the embedded texts, so a changed model
or corpus re-encodes while a repeated run starts in seconds. Search is a brute-force matrix product: exact,
and fast enough for BEIR-sized corpora on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from sidecar.eval import cache
from sidecar.eval.datasets import Dataset
from sidecar.eval.first_stage import Hit, advance, progress_task

_FORMAT = "dense-exact-v1"
# Documents per encode call: big enough to keep the model busy, small enough for a lively progress bar.
_CHUNK = 256


def packaged_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 (the same weights the sidecar serves by default)."""
    from sidecar.model_factory import packaged_embedding_model_dir

    return packaged_embedding_model_dir()


def model_fingerprint(model: str | Path) -> str:
    """Content hash of a local model directory (every file), or the name itself for a hub id."""
    path = Path(model)
    if not path.is_dir():
        return f"name:{model}"
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(cache.file_digest(f).encode())
    return h.hexdigest()[:20]


class DenseExact:
    name = "dense"

    def __init__(
        self,
        dataset: Dataset,
        *,
        model: str | Path | None = None,
        batch_size: int = 32,
        device: str | None = None,
        normalize: bool = True,
        cache_root: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        self.model_path = str(model or packaged_model_dir())
        self.normalize = normalize
        self.batch_size = batch_size
        self.model = SentenceTransformer(
            self.model_path, device=device, local_files_only=Path(self.model_path).is_dir()
        )
        self.model.eval()
        self.doc_ids = list(dataset.corpus)
        texts = [dataset.corpus[d].joined() for d in self.doc_ids]
        key = cache.digest(_FORMAT, model_fingerprint(self.model_path), str(normalize), *self.doc_ids, *texts)
        self.cache_entry = (cache_root or cache.cache_dir()) / "dense" / f"{dataset.name}-{key}"
        self.embeddings = self._load_or_encode(texts, dataset.name, progress)
        # Hugging Face fast tokenizers raise "Already borrowed" when one instance is used from two threads at
        # once, so concurrent replay threads take turns encoding their query (the matrix product runs freely).
        self._encode_lock = threading.Lock()

    def _load_or_encode(self, texts: list[str], name: str, progress: Progress | None) -> np.ndarray:
        matrix = self.cache_entry / "embeddings.npy"
        if cache.is_complete(self.cache_entry):
            return np.load(matrix)
        # Encoding in length order keeps padding (wasted compute) low across chunks, not just within one.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: np.ndarray | None = None
        label = "/".join(Path(self.model_path).parts[-2:])
        task = progress_task(progress, f"encoding {name} ({label})", len(texts))
        for start in range(0, len(order), _CHUNK):
            idx = order[start : start + _CHUNK]
            emb = self.model.encode(
                [texts[i] for i in idx],
                batch_size=self.batch_size,
                normalize_embeddings=self.normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            ).astype(np.float32)
            if out is None:
                out = np.zeros((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
            advance(progress, task, len(idx))
        assert out is not None
        with cache.building(self.cache_entry) as scratch:
            np.save(scratch / "embeddings.npy", out)
            (scratch / "meta.json").write_text(
                json.dumps({"model": self.model_path, "documents": len(texts)})
            )
        return out

    def encode_query(self, query: str) -> np.ndarray:
        with self._encode_lock:
            q = self.model.encode(
                [query], normalize_embeddings=self.normalize, convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(q[0], dtype=np.float32)

    def search(self, query: str, k: int) -> list[Hit]:
        scores = self.embeddings @ self.encode_query(query)
        k = min(k, len(scores))
        top = np.sort(np.argpartition(-scores, k - 1)[:k]) if k < len(scores) else np.arange(len(scores))
        # Stable sort of corpus-ordered candidates: equal scores keep corpus order (deterministic results).
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Hit(self.doc_ids[i], float(scores[i])) for i in top]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "dense",
            "model": self.model_path,
            "search": "exact inner product" + (" (normalised: cosine)" if self.normalize else ""),
            "dimensions": int(self.embeddings.shape[1]),
            "cache": str(self.cache_entry),
        }

    def thread_exit(self) -> None:
        pass

    def close(self) -> None:
        pass
