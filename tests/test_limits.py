"""Bounded work per request: documents are clipped to what the model reads (scores unchanged), so memory
and tokenizer time per request stay bounded whatever the body size; tokenization runs in small steps;
the embedding cache is bounded in bytes."""

from __future__ import annotations

import json
import tracemalloc
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar._proto.reranker.v1 import reranker_pb2_grpc as pb_grpc
from sidecar.launch import SidecarProcess
from sidecar.scoring.base import Pair
from tests.conftest import make_scorer, test_settings
from tests.fakes import RecordingScorer, TokenizerSpy
from tests.texts import documents, queries

TOL = 1e-5  # float32 against float32: the same tokens must give the same scores


def _long_texts() -> list[str]:
    natural = " ".join(documents(24))
    return [
        (natural + "\n") * 40,  # ~60k characters of real text with newlines
        " " * 30_000 + natural * 3,  # a run of whitespace the tokenizer drops: clipping must read past it
        "x" * 5_000 + " " + natural * 5,  # one very long word first
        "\t".join(natural.split()) * 8,  # tab-separated words
    ]


@pytest.mark.parametrize("model_fixture", ["bert_ce_dir", "modernbert_ce_dir"])
def test_clipped_documents_score_as_the_reference_on_whole_documents(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    from sentence_transformers import CrossEncoder

    model_dir: Path = request.getfixturevalue(model_fixture)
    scorer = make_scorer(model_dir, dtype="float32")
    pairs = [Pair(q, d) for q in [*queries(2), "why " * 400] for d in _long_texts()]
    measures = scorer.measure(pairs)
    clipped = [m.clipped or p for p, m in zip(pairs, measures, strict=True)]
    assert all(m.truncated for m in measures)
    assert sum(len(p.document) for p in clipped) < sum(len(p.document) for p in pairs) / 5
    reference = CrossEncoder(str(model_dir), device="cpu").predict(
        [(p.query, p.document) for p in pairs], batch_size=8
    )
    np.testing.assert_allclose(scorer.score(clipped), reference, atol=TOL, rtol=0)


def test_clipped_documents_embed_as_the_reference_on_whole_documents(packaged_model_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    scorer = make_scorer(None, dtype="float32", embedding_cache_bytes=0)
    pairs = [Pair(queries(1)[0], d) for d in _long_texts()]
    measures = scorer.measure(pairs)
    clipped = [m.clipped or p for p, m in zip(pairs, measures, strict=True)]
    assert all(m.clipped is not None and m.truncated for m in measures)
    st = SentenceTransformer(str(packaged_model_dir), device="cpu")
    q = st.encode([p.query for p in pairs], normalize_embeddings=True)
    d = st.encode([p.document for p in pairs], normalize_embeddings=True)
    np.testing.assert_allclose(scorer.score(clipped), (q * d).sum(1), atol=TOL, rtol=0)


def test_tokenizer_work_per_step_is_bounded_whatever_the_request(server_factory, bert_ce_dir: Path) -> None:
    """A huge request is tokenized in small steps (other requests' steps run in between) and only the
    part of each document the model reads ever reaches the model."""
    scorer = make_scorer(bert_ce_dir, dtype="float32")
    spy = TokenizerSpy(scorer._measure_tokenizer)  # type: ignore[attr-defined]
    scorer._measure_tokenizer = spy  # type: ignore[attr-defined]
    rec = RecordingScorer(scorer)
    srv = server_factory(test_settings(max_body_bytes=16 << 20), scorer=rec)
    huge = ("influenza vaccination trial results " * 200_000)[: 6 << 20]
    body = json.dumps({"query": "influenza vaccine", "documents": [huge]}).encode()
    port = srv.server.http_port
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/rerank", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert json.loads(resp.read())["results"][0]["index"] == 0
    many = [pb.Document(text=("protein folding " * 2_000) + str(i)) for i in range(200)]
    with grpc.insecure_channel(srv.target) as ch:
        reply = pb_grpc.RerankerServiceStub(ch).Rerank(
            pb.RerankRequest(query="protein", documents=many), timeout=120
        )
    assert len(reply.results) == 200 and all(r.truncated for r in reply.results)
    max_length = scorer.info.max_length
    # One step: at most a slice of 32 documents, each read up to 4x its first guess of 8 chars a token.
    assert max(spy.call_chars) <= 32 * (max_length * 8 * 4 + 100)
    assert sum(spy.call_chars) < (len(huge) + 200 * 32_000) / 10
    assert max(len(p.document) for p in rec.seen) <= (max_length + 8) * 8 * 4  # + the query's tokens


def test_memory_per_request_is_bounded_by_the_model_not_the_body(bert_ce_dir: Path, tmp_path: Path) -> None:
    """A 6 MB one-document request moves the process's peak RSS by a few times the body, not by
    gigabytes (it used to take RSS from 0.7 to 2.3 GB for 7.5 MB)."""
    body_mb = 6
    args = ["--model", str(bert_ce_dir), "--dtype", "float32", "--max-body-bytes", str(8 << 20)]
    with SidecarProcess(args, log_path=tmp_path / "serve.log") as sc:
        assert sc.proc is not None
        status = Path(f"/proc/{sc.proc.pid}/status")

        def peak_kb() -> int:
            line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
            return int(line.split()[1])

        def post(text: str) -> dict:
            body = json.dumps({"query": "influenza vaccine", "documents": [text, "short"]}).encode()
            req = urllib.request.Request(
                sc.http_url + "/v1/rerank", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read())

        post("a small request first, so one-off allocations are behind us")
        before = peak_kb()
        reply = post(("influenza vaccination trial results " * 200_000)[: body_mb << 20])
        growth_mb = (peak_kb() - before) / 1024
    assert len(reply["results"]) == 2
    assert growth_mb < 10 * body_mb, f"peak RSS grew {growth_mb:.0f} MB for a {body_mb} MB body"


def test_embedding_cache_is_bounded_in_bytes_whatever_the_document_length(packaged_model_dir: Path) -> None:
    limit = 64 << 10
    scorer = make_scorer(None, dtype="float32", embedding_cache_bytes=limit)
    long_docs = [
        f"document {i}: " + "cells divide and differentiate " * 500 for i in range(120)
    ]  # ~16k chars
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for start in range(0, len(long_docs), 20):
            pairs = [Pair("cell biology", d) for d in long_docs[start : start + 20]]
            scorer.score([m.clipped or p for p, m in zip(pairs, scorer.measure(pairs), strict=True)])
        kept = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert 0 < len(scorer.cache) < 120  # type: ignore[attr-defined]  # it evicted
    # What the cache keeps (keys and vectors) stays near its budget: a key is a hash, not the text.
    assert kept < 2 * limit, f"{kept} bytes kept for a {limit}-byte cache"
    # And it still answers for the most recent documents.
    last = [Pair("cell biology", d) for d in long_docs[-3:]]
    assert [m.tokens for m in scorer.measure(last)] == [1, 1, 1]
