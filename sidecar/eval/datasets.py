"""BEIR datasets: loading a BEIR-layout directory, finding the default one, and downloading by name.

A BEIR directory holds `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`) and
`qrels/<split>.tsv` (`query-id`, `corpus-id`, `score`, with a header line). Upstream files mix LF and CRLF
line ends, so everything is read with universal newlines.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.eval import cache

DEFAULT_DATASET = "scifact"
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets"
ENV_BEIR_URL = "RERANK_BEIR_URL"

# MD5 of each archive as published in the BEIR README (the BEIR host offers nothing stronger to check).
PUBLISHED_MD5 = {
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "webis-touche2020": "46f650ba5a527fc69e0a6521c5a23563",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "quora": "18fb154900ba42a600f84b839c173167",
    "cqadupstack": "4e41456d7df8ee7760a7f866133bda78",
    "dbpedia-entity": "c2a39eb420a3164af735795df012ac2c",
    "climate-fever": "8b66f0a9126c521bae2bde127b4dc99d",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "hotpotqa": "f412724f78b0d91183a0e86805e16114",
}

DIR_OPTION = "--dataset-dir"


class DatasetError(Exception):
    """A dataset cannot be found, downloaded or parsed; the message says what to do about it."""


@dataclass(frozen=True)
class CorpusDoc:
    title: str
    text: str

    def flat(self) -> str:
        """pyserini's BEIR "flat" contents: the title and text as one field, separated by a newline."""
        return f"{self.title}\n{self.text}"

    def joined(self) -> str:
        """What a neural model reads: the title and text joined with a space (the BEIR / sentence-transformers
        convention, and the sidecar's own `Document.model_text`)."""
        return f"{self.title} {self.text}" if self.title else self.text


@dataclass
class Dataset:
    name: str
    path: Path
    split: str
    corpus: dict[str, CorpusDoc]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    warnings: list[str] = field(default_factory=list)

    def query_ids(self, max_queries: int | None = None) -> list[str]:
        """Judged queries of the split, in qrels file order (so a slice is stable across runs)."""
        qids = [q for q in self.qrels if q in self.queries]
        return qids[:max_queries] if max_queries else qids

    def qrels_for(self, qids: list[str]) -> dict[str, dict[str, int]]:
        return {q: self.qrels[q] for q in qids}


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    # newline=None (universal newlines) turns CRLF into LF; the BOM-tolerant codec handles Windows exports.
    with path.open(encoding="utf-8-sig", newline=None) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if line.strip():
                yield lineno, line


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    for lineno, line in _read_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from None
        if not isinstance(obj, dict) or "_id" not in obj:
            raise DatasetError(f"{path}:{lineno}: expected a JSON object with an '_id' field")
        yield lineno, obj


def read_corpus(path: Path) -> dict[str, CorpusDoc]:
    corpus: dict[str, CorpusDoc] = {}
    for lineno, obj in _read_jsonl(path):
        doc_id = str(obj["_id"])
        if doc_id in corpus:
            raise DatasetError(f"{path}:{lineno}: duplicate document id {doc_id!r}")
        corpus[doc_id] = CorpusDoc(title=str(obj.get("title") or ""), text=str(obj.get("text") or ""))
    if not corpus:
        raise DatasetError(f"{path}: no documents")
    return corpus


def read_queries(path: Path) -> dict[str, str]:
    return {str(obj["_id"]): str(obj.get("text") or "") for _, obj in _read_jsonl(path)}


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in _read_lines(path):
        cols = line.split("\t")
        if len(cols) < 3:
            raise DatasetError(f"{path}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>score'")
        qid, doc_id, score = cols[0].strip(), cols[1].strip(), cols[-1].strip()
        try:
            rel = int(float(score))
        except ValueError:
            if lineno == 1 or not qrels:
                continue  # the header line ("query-id corpus-id score")
            raise DatasetError(f"{path}:{lineno}: relevance {score!r} is not a number") from None
        qrels.setdefault(qid, {})[doc_id] = rel
    if not qrels:
        raise DatasetError(f"{path}: no judgments")
    return qrels


def load(path: str | os.PathLike[str], split: str = "test", name: str | None = None) -> Dataset:
    """Load a BEIR-layout directory; every missing piece is named in the error, with what to pass instead."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"dataset directory {root} does not exist (pass {DIR_OPTION} PATH to a BEIR directory)"
        )
    corpus_path, queries_path = root / "corpus.jsonl", root / "queries.jsonl"
    qrels_path = root / "qrels" / f"{split}.tsv"
    for p in (corpus_path, queries_path):
        if not p.is_file():
            raise DatasetError(f"{root} is not a BEIR directory: {p.name} is missing")
    if not qrels_path.is_file():
        splits = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        have = f"available splits: {', '.join(splits)}" if splits else "no qrels/*.tsv files at all"
        raise DatasetError(f"{root}: no qrels for split {split!r} ({qrels_path} is missing; {have})")
    corpus = read_corpus(corpus_path)
    queries = read_queries(queries_path)
    qrels = read_qrels(qrels_path)
    warnings = []
    missing = [q for q in qrels if q not in queries]
    if missing:
        warnings.append(f"{len(missing)} judged queries have no text in queries.jsonl and are skipped")
    if len(missing) == len(qrels):
        raise DatasetError(f"{qrels_path}: none of the judged queries appear in {queries_path}")
    return Dataset(name or root.name, root, split, corpus, queries, qrels, warnings)


def repo_root() -> Path:
    """The checkout this package runs from (the directory above `sidecar/`)."""
    return Path(__file__).resolve().parents[2]


def local_candidates(name: str) -> list[Path]:
    """Where a copy of a named dataset may already sit: the shared development data, then the cache."""
    rel = Path("..") / "shared" / "data" / "beir" / name
    return [Path.cwd() / rel, repo_root() / rel, cache.cache_dir() / "beir" / name]


def resolve(
    dataset_dir: str | None,
    name: str | None,
    *,
    download_ok: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
) -> tuple[Path, str]:
    """Find the dataset to use: an explicit directory, else a local copy of `name`, else a download."""
    if dataset_dir:
        path = Path(dataset_dir).expanduser()
        if not path.is_dir():
            raise DatasetError(f"{DIR_OPTION} {dataset_dir}: no such directory")
        return path, name or path.name
    name = name or DEFAULT_DATASET
    for candidate in local_candidates(name):
        if (candidate / "corpus.jsonl").is_file() and (candidate / "queries.jsonl").is_file():
            return candidate.resolve(), name
    if not download_ok:
        raise DatasetError(f"no local copy of {name!r}; pass {DIR_OPTION} PATH to a BEIR directory")
    return download(name, progress=progress), name


def download(
    name: str,
    *,
    root: Path | None = None,
    base_url: str | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download and unpack a BEIR archive into the cache (once); checks the published MD5 if one is known."""
    root = root or cache.cache_dir() / "beir"
    entry = root / name
    if cache.is_complete(entry):
        return entry
    base = (base_url or os.environ.get(ENV_BEIR_URL) or BEIR_URL).rstrip("/")
    url = f"{base}/{name}.zip"
    expected = md5 or PUBLISHED_MD5.get(name)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / f"{name}.zip"
        try:
            _fetch(url, archive, timeout, progress)
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DatasetError(
                f"cannot download BEIR dataset {name!r} from {url} ({reason}). Without network access, pass "
                f"{DIR_OPTION} PATH pointing at a BEIR directory "
                "(corpus.jsonl, queries.jsonl, qrels/<split>.tsv)"
            ) from None
        actual = cache.file_digest(archive, "md5")
        if expected and actual != expected:
            raise DatasetError(f"{url}: MD5 {actual} does not match the published {expected}; not using it")
        with cache.building(entry) as scratch:
            _unpack(archive, scratch)
            (scratch / "SOURCE").write_text(f"{url}\nmd5 {actual}\nverified {bool(expected)}\n")
    return entry


def _fetch(url: str, dest: Path, timeout: float, progress: Callable[[int, int | None], None] | None) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as resp, dest.open("wb") as out:
        total = resp.headers.get("Content-Length")
        size = int(total) if total and total.isdigit() else None
        done = 0
        while block := resp.read(1 << 20):
            out.write(block)
            done += len(block)
            if progress:
                progress(done, size)


def _unpack(archive: Path, dest: Path) -> None:
    """Extract the archive's BEIR files into `dest`, flattening the archive's top-level folder."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DatasetError(f"{archive.name} is not a zip archive") from None
    with zf, tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        for member in zf.namelist():
            target = (Path(tmp) / member).resolve()
            if not target.is_relative_to(Path(tmp).resolve()):
                raise DatasetError(f"{archive.name}: refusing member {member!r} outside the archive root")
        zf.extractall(tmp)
        found = sorted(p.parent for p in Path(tmp).rglob("corpus.jsonl"))
        if not found:
            raise DatasetError(f"{archive.name} holds no corpus.jsonl: not a BEIR archive")
        for item in found[0].iterdir():
            shutil.move(str(item), dest / item.name)
