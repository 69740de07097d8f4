"""LLM rerankers through a real sidecar: gRPC server on ephemeral ports, real client, scores equal to the
independent transformers reference of test_llm_rerankers.py; ERank's hybrid as a fusion method."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar._proto.reranker.v1 import reranker_pb2_grpc as pb_grpc
from sidecar.client import RerankerClient
from sidecar.fusion import FusionMethod, FusionSpec, fuse
from sidecar.fusion_pb import fusion_from_proto, fusion_to_proto
from sidecar.scoring.base import Pair, Scorer
from sidecar.types import Document
from tests.conftest import test_settings
from tests.llm.test_llm_rerankers import (
    ERANK_NEW_TOKENS,
    INSTRUCTION,
    TOL,
    reference_erank_scores,
    reference_logit_scores,
)
from tests.texts import documents, queries


def test_erank_hybrid_reproduces_the_model_card_example() -> None:
    """ERank's card, alpha 0.2: query "I am happy", documents excited / sad / peaceful with first-stage
    scores 46.7 / 1.5 / 2.3 (input order) and rank scores 4.84 / 0.0 / 2.98 (the card lists them sorted:
    4.84, 2.98, 0.0) give hybrid scores 1.18 / -1.19 / 0.01 (sorted: 1.18, 0.01, -1.19). Population std;
    the sample std would give 0.96 / -0.97 / 0.00, and pairing the sorted columns 1.18 / 0.00 / -1.18."""
    spec = FusionSpec("erank_hybrid", alpha=0.2)
    hybrid = fuse(spec, [4.84, 0.0, 2.98], [46.7, 1.5, 2.3])
    assert [round(h, 2) for h in hybrid] == [1.18, -1.19, 0.01]
    assert spec.to_dict() == {"method": "erank_hybrid", "alpha": 0.2}
    assert FusionSpec.parse("erank_hybrid").method is FusionMethod.ERANK_HYBRID
    assert fusion_from_proto(fusion_to_proto(spec)) == spec
    assert spec.describe() == "erank_hybrid(alpha=0.2)"


def test_qwen3_reranker_over_grpc_equals_reference(server_factory, llm_dirs: dict[str, Path]) -> None:
    path = llm_dirs["qwen3-reranker"]
    srv = server_factory(test_settings(model=str(path), dtype="float32"))
    query, docs = queries(1)[0], [d[:300] for d in documents(6)]
    with RerankerClient(srv.target) as client:
        info = client.info()
        assert info.backend == "causal-lm/qwen3-reranker" and info.accepts_instruction
        plain = client.rerank(query, [Document(text=t) for t in docs])
        instructed = client.rerank(query, [Document(text=t) for t in docs], instruction=INSTRUCTION)
    for result, instruction in ((plain, None), (instructed, INSTRUCTION)):
        reference = reference_logit_scores(
            "qwen3-reranker", path, [Pair(query, d, instruction) for d in docs]
        )
        got = np.empty(len(docs))
        for h in result.hits:
            got[h.index] = h.score
        np.testing.assert_allclose(got, reference, atol=TOL, rtol=0)
        assert [h.index for h in result.hits] == list(np.argsort(-reference, kind="stable"))
    assert any(abs(a.score - b.score) > 1e-3 for a, b in zip(plain.hits, instructed.hits, strict=True))


def test_erank_over_grpc_with_hybrid_fusion(server_factory, llm_dirs: dict[str, Path]) -> None:
    path = llm_dirs["erank"]
    srv = server_factory(
        test_settings(model=str(path), dtype="float32", llm_max_new_tokens=ERANK_NEW_TOKENS, warmup=False)
    )
    query, docs = queries(1)[0], [d[:300] for d in documents(4)]
    first_stage = [46.7, 1.5, 2.3, 9.0]
    request = [
        Document(text=t, id=f"d{i}", first_stage_score=f)
        for i, (t, f) in enumerate(zip(docs, first_stage, strict=True))
    ]
    with RerankerClient(srv.target) as client:
        result = client.rerank(query, request, fusion=FusionSpec("erank_hybrid", alpha=0.2))
    assert result.fusion == FusionSpec("erank_hybrid", alpha=0.2)
    reference, texts = reference_erank_scores(path, [Pair(query, d) for d in docs])
    rank = {h.index: h.score for h in result.hits}
    np.testing.assert_allclose(
        [rank[i] for i in range(len(docs))], reference, atol=TOL, rtol=0, err_msg=str(texts)
    )

    def z(xs: list[float]) -> np.ndarray:
        a = np.asarray(xs, dtype=np.float64)
        return (a - a.mean()) / a.std() if a.std() > 0 else np.zeros_like(a)

    expected = 0.2 * z(first_stage) + 0.8 * z(list(reference))
    for h in result.hits:
        assert h.fused_score == pytest.approx(expected[h.index], abs=1e-3)
    assert [h.index for h in result.hits] == list(np.argsort(-expected, kind="stable"))


def test_hybrid_needs_first_stage_scores(server_factory, llm_dirs: dict[str, Path]) -> None:
    srv = server_factory(test_settings(model=str(llm_dirs["qwen3-reranker"]), dtype="float32", warmup=False))
    request = pb.RerankRequest(
        query="q", documents=[pb.Document(text="d", first_stage_score=1.0), pb.Document(text="e")]
    )
    request.fusion.CopyFrom(fusion_to_proto(FusionSpec("erank_hybrid")))
    with grpc.insecure_channel(srv.target) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.RerankerServiceStub(ch).Rerank(request, timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "erank_hybrid" in err.value.details() and "documents[1]" in err.value.details()


def test_instruction_to_a_model_that_takes_none_is_still_invalid(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(scorer=bert_scorer)
    with grpc.insecure_channel(srv.target) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.RerankerServiceStub(ch).Rerank(
            pb.RerankRequest(query="q", documents=[pb.Document(text="d")], instruction=INSTRUCTION),
            timeout=30,
        )
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "takes no instruction" in err.value.details()
