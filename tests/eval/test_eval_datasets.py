"""BEIR loading (LF, CRLF, BOM), clear errors for what is missing, and checksum-verified downloads."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.eval import cache, datasets
from sidecar.eval.datasets import DatasetError
from tests.eval.beir_helpers import TINY_CORPUS, write_beir


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_loads_lf_and_crlf_identically(beir_factory: Callable[..., Path], newline: str) -> None:
    root = beir_factory(newline=newline)
    if newline == "\r\n":
        assert b"\r\n" in (root / "qrels" / "test.tsv").read_bytes()
    ds = datasets.load(root)
    assert len(ds.corpus) == 5
    assert ds.corpus["d2"].title == "Dogs"
    assert ds.corpus["d5"].title == ""
    assert ds.queries["q1"] == "why do dogs bark"  # no stray "\r" on the last field
    assert ds.qrels == {"q1": {"d2": 1}, "q2": {"d3": 1}, "q3": {"d4": 2, "d1": 0}}
    assert ds.query_ids() == ["q1", "q2", "q3"]  # judged queries only, in qrels order
    assert ds.query_ids(2) == ["q1", "q2"]


def test_byte_order_mark_and_blank_lines(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "b")
    corpus = root / "corpus.jsonl"
    corpus.write_bytes(b"\xef\xbb\xbf" + corpus.read_bytes() + b"\n\n")
    assert len(datasets.load(root).corpus) == 5


def test_contents_conventions(tiny: datasets.Dataset) -> None:
    assert tiny.corpus["d1"].flat() == "Cats\nCats are small carnivorous mammals kept as pets."
    assert tiny.corpus["d1"].joined() == "Cats Cats are small carnivorous mammals kept as pets."
    assert tiny.corpus["d5"].joined() == TINY_CORPUS[4]["text"]  # no leading space without a title


def test_scifact_matches_its_readme(scifact: datasets.Dataset) -> None:
    assert len(scifact.corpus) == 5183
    assert len(scifact.queries) == 1109
    assert len(scifact.query_ids()) == 300
    assert sum(len(v) for v in scifact.qrels.values()) == 339


def test_missing_directory_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="--dataset-dir"):
        datasets.load(tmp_path / "nope")


@pytest.mark.parametrize("missing", ["corpus.jsonl", "queries.jsonl"])
def test_missing_file_is_named(beir_factory: Callable[..., Path], missing: str) -> None:
    root = beir_factory()
    (root / missing).unlink()
    with pytest.raises(DatasetError, match=missing):
        datasets.load(root)


def test_missing_split_lists_the_available_ones(beir_factory: Callable[..., Path]) -> None:
    root = beir_factory(split="dev")
    with pytest.raises(DatasetError, match=r"split 'test'.*available splits: dev"):
        datasets.load(root)


def test_malformed_line_is_located(beir_factory: Callable[..., Path]) -> None:
    root = beir_factory()
    with (root / "corpus.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(DatasetError, match=r"corpus.jsonl:6"):
        datasets.load(root)


def test_bad_relevance_is_located(beir_factory: Callable[..., Path]) -> None:
    root = beir_factory()
    with (root / "qrels" / "test.tsv").open("a") as f:
        f.write("q1\td1\tvery\n")
    with pytest.raises(DatasetError, match=r"test.tsv:6.*'very'"):
        datasets.load(root)


def test_judged_queries_without_text_are_skipped_with_a_warning(beir_factory: Callable[..., Path]) -> None:
    root = beir_factory(qrels=[("q1", "d2", 1), ("q9", "d1", 1)])
    ds = datasets.load(root)
    assert ds.query_ids() == ["q1"]
    assert "1 judged queries have no text" in ds.warnings[0]


def test_resolve_prefers_an_explicit_directory_then_local_copies(
    beir_factory: Callable[..., Path], scifact_dir: Path
) -> None:
    root = beir_factory()
    assert datasets.resolve(str(root), None) == (root, root.name)
    path, name = datasets.resolve(None, None, download_ok=False)  # the shared SciFact copy
    assert name == "scifact"
    assert path == scifact_dir.resolve()
    with pytest.raises(DatasetError, match="--dataset-dir"):
        datasets.resolve(None, "no-such-dataset", download_ok=False)


# ---- downloads -----------------------------------------------------------------------------------
def _zip_of(root: Path, name: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, f"{name}/{p.relative_to(root)}")
    return buf.getvalue()


@pytest.fixture
def http_files() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A real HTTP server on a free port serving an in-memory {path: bytes} map."""
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/beir", files
    server.shutdown()
    server.server_close()


def test_download_verifies_unpacks_and_caches(
    tmp_path: Path, http_files: tuple[str, dict[str, bytes]]
) -> None:
    base, files = http_files
    archive = _zip_of(write_beir(tmp_path / "src", newline="\r\n"), "tinyset")
    files["/beir/tinyset.zip"] = archive
    md5 = hashlib.md5(archive).hexdigest()
    seen: list[int] = []
    path = datasets.download(
        "tinyset",
        root=tmp_path / "cache",
        base_url=base,
        md5=md5,
        progress=lambda done, total: seen.append(done),
    )
    assert path == tmp_path / "cache" / "tinyset"
    assert cache.is_complete(path)
    assert seen[-1] == len(archive)
    assert len(datasets.load(path).corpus) == 5
    assert f"md5 {md5}" in (path / "SOURCE").read_text()
    # Cached: a second call does not touch the network (the server no longer has the file).
    files.clear()
    assert datasets.download("tinyset", root=tmp_path / "cache", base_url=base, md5=md5) == path


def test_download_refuses_a_checksum_mismatch(
    tmp_path: Path, http_files: tuple[str, dict[str, bytes]]
) -> None:
    base, files = http_files
    files["/beir/tinyset.zip"] = _zip_of(write_beir(tmp_path / "src"), "tinyset")
    with pytest.raises(DatasetError, match="does not match the published"):
        datasets.download("tinyset", root=tmp_path / "cache", base_url=base, md5="0" * 32)
    assert not (tmp_path / "cache" / "tinyset").exists()


def test_offline_download_names_the_directory_option(
    tmp_path: Path, http_files: tuple[str, dict[str, bytes]]
) -> None:
    base, _ = http_files  # serves 404 for everything, like a host without the file
    with pytest.raises(DatasetError, match=r"cannot download BEIR dataset 'scifact'.*--dataset-dir"):
        datasets.download("scifact", root=tmp_path / "cache", base_url=base)
    # An unreachable host (nothing listens on port 9 of localhost) says the same.
    with pytest.raises(DatasetError, match="--dataset-dir"):
        datasets.download("scifact", root=tmp_path / "cache", base_url="http://127.0.0.1:9/x", timeout=5)


def test_known_archives_have_published_checksums() -> None:
    assert datasets.PUBLISHED_MD5["scifact"] == "5f7d1de60b170fc8027bb7898e2efca1"
    assert all(len(v) == 32 for v in datasets.PUBLISHED_MD5.values())
