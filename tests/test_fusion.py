"""Score fusion: the arithmetic against hand-computed values, then through a real server over gRPC and
HTTP (the response's order is its fused scores, raw scores stay the model's, the applied fusion is echoed)."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar._proto.reranker.v1 import reranker_pb2_grpc as pb_grpc
from sidecar.client import RerankerClient
from sidecar.errors import InvalidInput, InvalidSchema
from sidecar.fusion import (
    NO_FUSION,
    FusionMethod,
    FusionSpec,
    Normalization,
    configured_default,
    fuse,
    load_model_fusion,
    normalize,
    ranks,
)
from sidecar.opensearch import mlcommons
from sidecar.scoring.base import Pair, Scorer
from sidecar.types import Document, RerankResult
from tests.conftest import test_settings
from tests.opensearch.conftest import http_request, post_json
from tests.texts import documents, queries

BLEND = FusionMethod.BLEND
RRF = FusionMethod.RRF
EXACT = 1e-12


# ---- arithmetic (hand-computed) -----------------------------------------------------------------
def test_minmax_blend() -> None:
    # reranker [3, -1, 1, 0] -> (x + 1) / 4 = [1, 0, 0.5, 0.25]; first stage [4, 8, 6, 5] -> (x - 4) / 4
    # = [0, 1, 0.5, 0.25]; 0.3 * reranker + 0.7 * first stage:
    fused = fuse(FusionSpec(BLEND, alpha=0.3), [3.0, -1.0, 1.0, 0.0], [4.0, 8.0, 6.0, 5.0])
    assert fused == pytest.approx([0.3, 0.7, 0.5, 0.25], abs=EXACT)


def test_zscore_blend() -> None:
    # reranker [2, 4, 4, 4, 5, 5, 7, 9]: mean 5, population std 2 -> [-1.5, -0.5 x3, 0, 0, 1, 2];
    # first stage [10 x4, 30 x4]: mean 20, std 10 -> [-1 x4, 1 x4]; 0.75 * reranker + 0.25 * first stage:
    spec = FusionSpec(BLEND, alpha=0.75, normalization=Normalization.ZSCORE)
    fused = fuse(spec, [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0], [10.0] * 4 + [30.0] * 4)
    assert fused == pytest.approx([-1.375, -0.625, -0.625, -0.625, 0.25, 0.25, 1.0, 1.75], abs=EXACT)


def test_rrf_with_first_stage_scores() -> None:
    # reranker ranks [1, 3, 2], first-stage ranks (by score) [3, 1, 2]; k = 1:
    # 1/2 + 1/4, 1/4 + 1/2, 1/3 + 1/3
    fused = fuse(FusionSpec(RRF, rrf_k=1), [0.9, 0.1, 0.5], [1.0, 3.0, 2.0])
    assert fused == pytest.approx([0.75, 0.75, 2 / 3], abs=EXACT)
    # k = 60: 1/61 + 1/63, 1/63 + 1/61, 1/62 + 1/62
    fused = fuse(FusionSpec(RRF), [0.9, 0.1, 0.5], [1.0, 3.0, 2.0])
    assert fused == pytest.approx([1 / 61 + 1 / 63, 1 / 63 + 1 / 61, 2 / 62], abs=EXACT)


def test_rrf_without_scores_uses_request_order() -> None:
    # reranker ranks [3, 1, 2]; no first-stage scores, so the request order is the first-stage rank [1, 2, 3]
    expected = [1 / 63 + 1 / 61, 1 / 61 + 1 / 62, 1 / 62 + 1 / 63]
    assert fuse(FusionSpec(RRF), [0.1, 0.9, 0.5], [None, None, None]) == pytest.approx(expected, abs=EXACT)
    # Scores on only some documents cannot rank them all: request order again.
    assert fuse(FusionSpec(RRF), [0.1, 0.9, 0.5], [9.0, None, 1.0]) == pytest.approx(expected, abs=EXACT)


def test_ranks_break_ties_by_input_position() -> None:
    assert ranks([0.5, 0.9, 0.5, 0.1]) == [2, 1, 3, 4]


def test_alpha_extremes_reproduce_each_order() -> None:
    rerank = [0.2, 0.9, -0.4, 0.5]
    first = [3.0, 1.0, 4.0, 2.0]
    for how in Normalization:
        only_rerank = fuse(FusionSpec(BLEND, alpha=1.0, normalization=how), rerank, first)
        only_first = fuse(FusionSpec(BLEND, alpha=0.0, normalization=how), rerank, first)
        assert ranks(only_rerank) == ranks(rerank)
        assert ranks(only_first) == ranks(first)
        assert only_rerank == pytest.approx(normalize(rerank, how), abs=EXACT)


def test_constant_scores_normalise_to_zero() -> None:
    for how in Normalization:
        # 0.1 three times: a computed std would be about 1e-17, not 0; the result must still be 0.
        assert normalize([0.1, 0.1, 0.1], how) == [0.0, 0.0, 0.0]
        assert normalize([7.0], how) == [0.0]
    # Constant first stage: only the reranker separates (0.5 * minmax of [1, 3, 2]).
    assert fuse(FusionSpec(BLEND), [1.0, 3.0, 2.0], [5.0, 5.0, 5.0]) == pytest.approx([0, 0.5, 0.25])


def test_none_is_the_reranker_score() -> None:
    assert fuse(NO_FUSION, [0.25, -3.5], [None, 1.0]) == [0.25, -3.5]


def test_blend_needs_every_first_stage_score() -> None:
    with pytest.raises(InvalidInput, match=r"documents\[1\] has none: send scores or use rrf"):
        fuse(FusionSpec(BLEND), [0.1, 0.2, 0.3], [1.0, None, None])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, "alpha=1.5 is out of range"),
        ({"alpha": -0.1}, "alpha=-0.1 is out of range"),
        ({"alpha": float("nan")}, "alpha=nan is out of range"),
        ({"rrf_k": 0}, "rrf_k=0 is out of range"),
        ({"rrf_k": True}, "rrf_k=True is out of range"),
        ({"rrf_k": 2.5}, "rrf_k=2.5 is out of range"),
    ],
)
def test_spec_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        FusionSpec(BLEND, **kwargs)


def test_dict_forms() -> None:
    spec = FusionSpec(BLEND, alpha=0.3, normalization=Normalization.ZSCORE)
    assert spec.to_dict() == {"method": "blend", "alpha": 0.3, "normalization": "zscore"}
    assert FusionSpec.from_dict(spec.to_dict()) == spec
    assert FusionSpec(RRF, rrf_k=10).to_dict() == {"method": "rrf", "rrf_k": 10}
    assert NO_FUSION.to_dict() == {"method": "none"}
    assert FusionSpec.parse("rrf") == FusionSpec(RRF)
    assert FusionSpec.parse({"method": "blend"}) == FusionSpec(BLEND, alpha=0.5)
    assert spec.describe() == "blend(alpha=0.3, zscore)"
    assert FusionSpec(RRF).describe() == "rrf(k=60)" and NO_FUSION.describe() == "none"


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("sum", InvalidSchema, "use one of 'none', 'blend', 'rrf'"),
        (5, InvalidSchema, "must be an object or a method name, got number"),
        ({"alpha": 0.3}, InvalidSchema, "fusion.method` is missing"),
        ({"method": "blend", "alhpa": 0.3}, InvalidSchema, "unknown key 'alhpa'"),
        ({"method": "blend", "normalization": "l2"}, InvalidSchema, "use one of 'minmax', 'zscore'"),
        ({"method": "blend", "alpha": "0.3"}, InvalidSchema, "alpha` must be a number, got string"),
        ({"method": "rrf", "rrf_k": 60.0}, InvalidSchema, "rrf_k` must be an integer"),
        ({"method": "blend", "alpha": 2}, InvalidInput, "alpha=2 is out of range"),
    ],
)
def test_parse_errors(value: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        FusionSpec.parse(value)


def test_model_fusion_file(tmp_path: Path) -> None:
    assert load_model_fusion(tmp_path) is None
    (tmp_path / "fusion.json").write_text(
        json.dumps(
            {"method": "blend", "alpha": 0.3, "normalization": "minmax", "rrf_k": 60, "dev_ndcg@10": 0.71}
        )
    )
    assert load_model_fusion(tmp_path) == FusionSpec(BLEND, alpha=0.3)
    (tmp_path / "fusion.json").write_text('{"method": "blend", "alpha": 3}')
    with pytest.raises(ValueError, match=r"fusion\.json: fusion alpha=3 is out of range"):
        load_model_fusion(tmp_path)
    (tmp_path / "fusion.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not readable JSON"):
        load_model_fusion(tmp_path)


def test_configured_default(tmp_path: Path) -> None:
    spec, _ = configured_default(test_settings(fusion="rrf", fusion_rrf_k=10), None)
    assert spec == FusionSpec(RRF, rrf_k=10)
    hub = test_settings(model="owner/some-reranker")
    assert configured_default(hub, None)[0] == NO_FUSION  # auto, hub id
    local = test_settings(model=str(tmp_path))
    assert configured_default(local, tmp_path)[0] == NO_FUSION  # auto, no file
    (tmp_path / "fusion.json").write_text('{"method": "rrf", "rrf_k": 20}')
    assert configured_default(local, tmp_path)[0] == FusionSpec(RRF, rrf_k=20)
    # An explicit setting wins over the file.
    assert configured_default(test_settings(model=str(tmp_path), fusion="none"), tmp_path)[0] == NO_FUSION
    # The packaged model (no --model) ships its weights, chosen on SciFact train queries.
    packaged, source = configured_default(test_settings(fusion="auto"), None)
    assert packaged == FusionSpec(FusionMethod.BLEND, alpha=0.7, normalization=Normalization.MINMAX)
    assert "SciFact train" in source


# ---- through a real server ----------------------------------------------------------------------
QUERY = queries(1)[0]
TEXTS = documents(8)
# First-stage scores that disagree with the (random) model, so fusion visibly reorders.
FIRST = [8.0, 1.0, 7.5, 3.0, 6.0, 2.0, 5.0, 4.5]
DOCS = [Document(text=t, id=f"d{i}", first_stage_score=FIRST[i]) for i, t in enumerate(TEXTS)]


def _raw(scorer: Scorer) -> list[float]:
    return [float(x) for x in scorer.score([Pair(QUERY, t) for t in TEXTS])]


def _check_ranked(result: RerankResult, raw: list[float], spec: FusionSpec, first: list) -> None:
    """Order = descending fused score; raw scores are the model's; fused = fuse(spec) of the raw scores."""
    assert result.fusion == spec
    fused = [h.fused_score for h in result.hits]
    assert fused == sorted(fused, reverse=True)  # type: ignore[type-var]
    expected = fuse(spec, raw, first)
    for h in result.hits:
        assert h.score == pytest.approx(raw[h.index], abs=1e-5)
        assert h.fused_score == pytest.approx(expected[h.index], abs=1e-5)
        assert h.first_stage_score == first[h.index]
    order = sorted(range(len(raw)), key=lambda i: -expected[i])
    assert [h.index for h in result.hits] == order[: len(result.hits)]


def test_grpc_fusion_per_request(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(scorer=bert_scorer)
    raw = _raw(bert_scorer)
    with RerankerClient(srv.target) as client:
        plain = client.rerank(QUERY, DOCS)
        _check_ranked(plain, raw, NO_FUSION, FIRST)
        assert all(h.fused_score == h.score for h in plain.hits)
        assert client.info().default_fusion.method == pb.FUSION_METHOD_NONE
        for spec in (
            FusionSpec(BLEND, alpha=0.3),
            FusionSpec(BLEND, alpha=0.6, normalization=Normalization.ZSCORE),
            FusionSpec(BLEND, alpha=0.0),
            FusionSpec(RRF, rrf_k=5),
        ):
            result = client.rerank(QUERY, DOCS, fusion=spec)
            _check_ranked(result, raw, spec, FIRST)
            # Raw scores are the same with or without fusion; the order is not.
            assert {h.index: h.score for h in result.hits} == {h.index: h.score for h in plain.hits}
            assert [h.index for h in result.hits] != [h.index for h in plain.hits]
        # alpha 0 is the first-stage order; top_n cuts after fusing.
        top = client.rerank(QUERY, DOCS, top_n=3, fusion=FusionSpec(BLEND, alpha=0.0))
        assert [h.index for h in top.hits] == [0, 2, 4]
        # RRF without scores ranks the request order against the reranker's.
        bare = [Document(text=t) for t in TEXTS]
        _check_ranked(client.rerank(QUERY, bare, fusion=FusionSpec(RRF)), raw, FusionSpec(RRF), [None] * 8)


def test_request_fusion_beats_the_configured_default(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(test_settings(fusion="rrf", fusion_rrf_k=10), scorer=bert_scorer)
    raw = _raw(bert_scorer)
    with RerankerClient(srv.target) as client:
        info = client.info().default_fusion
        assert info.method == pb.FUSION_METHOD_RRF and info.rrf_k == 10 and not info.HasField("alpha")
        _check_ranked(client.rerank(QUERY, DOCS), raw, FusionSpec(RRF, rrf_k=10), FIRST)
        _check_ranked(client.rerank(QUERY, DOCS, fusion=NO_FUSION), raw, NO_FUSION, FIRST)
    # An unset method in the message means the default too.
    ch = grpc.insecure_channel(srv.target)
    stub = pb_grpc.RerankerServiceStub(ch)
    reply = stub.Rerank(
        pb.RerankRequest(query=QUERY, documents=[pb.Document(text="a")], fusion=pb.Fusion()), timeout=30
    )
    assert reply.fusion.method == pb.FUSION_METHOD_RRF
    ch.close()


def test_default_blend_without_scores_falls_back_to_none(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(test_settings(fusion="blend", fusion_alpha=0.3), scorer=bert_scorer)
    raw = _raw(bert_scorer)
    with RerankerClient(srv.target) as client:
        _check_ranked(client.rerank(QUERY, DOCS), raw, FusionSpec(BLEND, alpha=0.3), FIRST)
        bare = client.rerank(QUERY, TEXTS)
        _check_ranked(bare, raw, NO_FUSION, [None] * 8)
        client.rerank(QUERY, TEXTS)
    reply = post_json(
        f"http://127.0.0.1:{srv.server.http_port}", mlcommons.PATH_LIST, {"query": QUERY, "documents": TEXTS}
    )
    assert reply.status == 200 and reply.headers["x-rerank-fusion"] == "none"
    body = urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=5).read()
    text = body.decode()
    assert 'reranker_fusion_skipped_total{reason="no_first_stage_score"} 3.0' in text
    assert 'reranker_fusion_requests_total{method="none"} 3.0' in text
    assert 'reranker_fusion_requests_total{method="blend"} 1.0' in text


def test_grpc_fusion_that_cannot_apply_is_invalid_argument(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(scorer=bert_scorer)
    ch = grpc.insecure_channel(srv.target)
    stub = pb_grpc.RerankerServiceStub(ch)
    docs = [pb.Document(text="a", first_stage_score=1.0), pb.Document(text="b"), pb.Document(text="c")]
    bad = [
        (pb.Fusion(method=pb.FUSION_METHOD_BLEND), r"documents\[1\] has none: send scores or use rrf"),
        (pb.Fusion(method=pb.FUSION_METHOD_RRF, rrf_k=0), "rrf_k=0 is out of range"),
        (pb.Fusion(alpha=0.3), "fusion.method is unspecified"),
        (pb.Fusion(method=pb.FUSION_METHOD_BLEND, alpha=1.5), "alpha=1.5 is out of range"),
        (pb.Fusion(method=pb.FUSION_METHOD_BLEND, alpha=float("nan")), "alpha=nan is out of range"),
    ]
    for fusion, message in bad:
        with pytest.raises(grpc.RpcError) as err:
            stub.Rerank(pb.RerankRequest(query=QUERY, documents=docs, fusion=fusion), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert err.value.details() and re.search(message, err.value.details()), message
    ok = stub.Rerank(
        pb.RerankRequest(query=QUERY, documents=docs, fusion=pb.Fusion(method=pb.FUSION_METHOD_RRF)),
        timeout=30,
    )
    assert len(ok.results) == 3 and ok.fusion.rrf_k == 60
    ch.close()
    body = urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=5).read()
    assert 'reranker_requests_total{api="grpc",outcome="invalid_argument"} 5.0' in body.decode()


def test_http_fusion_on_every_shape(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(scorer=bert_scorer)
    url = f"http://127.0.0.1:{srv.server.http_port}"
    raw = _raw(bert_scorer)
    objs = [{"text": t, "id": f"d{i}", "first_stage_score": FIRST[i]} for i, t in enumerate(TEXTS)]
    fusion = {"method": "blend", "alpha": 0.3, "normalization": "zscore"}
    spec = FusionSpec.from_dict(fusion)
    expected = fuse(spec, raw, FIRST)
    order = sorted(range(8), key=lambda i: -expected[i])

    for path in ("/v1/rerank", "/v2/rerank"):
        reply = post_json(url, path, {"query": QUERY, "documents": objs, "fusion": fusion})
        assert reply.status == 200 and reply.headers["x-rerank-fusion"] == "blend(alpha=0.3, zscore)"
        body = reply.json()
        assert body["fusion"] == fusion
        results = body["results"]
        assert [r["index"] for r in results] == order
        for r in results:
            assert r["relevance_score"] == r["fused_score"]
            assert r["fused_score"] == pytest.approx(expected[r["index"]], abs=1e-5)
            assert r["rerank_score"] == pytest.approx(raw[r["index"]], abs=1e-5)
            assert r["first_stage_score"] == FIRST[r["index"]]

    listed = post_json(url, mlcommons.PATH_LIST, {"query": QUERY, "documents": objs, "fusion": fusion}).json()
    assert [r["index"] for r in listed] == order
    scores = post_json(url, mlcommons.PATH_SCORES, {"query": QUERY, "documents": objs, "fusion": fusion})
    np.testing.assert_allclose(scores.json()["scores"], expected, rtol=0, atol=1e-5)

    # OpenSearch sends bare strings in hit order: "rrf" fuses with that order.
    rrf = fuse(FusionSpec(RRF), raw, [None] * 8)
    for path in (mlcommons.PATH_LIST, mlcommons.PATH_SCORES):
        reply = post_json(url, path, {"query": QUERY, "documents": TEXTS, "fusion": "rrf"})
        assert reply.headers["x-rerank-fusion"] == "rrf(k=60)"
        got = reply.json()
        if path == mlcommons.PATH_SCORES:
            np.testing.assert_allclose(got["scores"], rrf, rtol=0, atol=1e-9)
        else:
            assert [r["index"] for r in got] == sorted(range(8), key=lambda i: -rrf[i])

    # Without fusion the Cohere shape still reports all three scores, equal where they should be.
    plain = post_json(url, "/v1/rerank", {"query": QUERY, "documents": TEXTS}).json()
    assert plain["fusion"] == {"method": "none"}
    for r in plain["results"]:
        assert r["relevance_score"] == r["rerank_score"] == r["fused_score"] and "first_stage_score" not in r
    info = http_request(url, "GET", "/v1/info").json()
    assert info["default_fusion"] == {"method": "none"}


def test_http_fusion_errors(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(scorer=bert_scorer)
    url = f"http://127.0.0.1:{srv.server.http_port}"
    scored = [{"text": "a", "first_stage_score": 1.0}, {"text": "b", "first_stage_score": 2}]
    cases = [
        ({"documents": ["a", "b"], "fusion": "blend"}, 400, r"documents\[0\] has none"),
        ({"documents": scored, "fusion": {"method": "blend", "alpha": 2}}, 400, "alpha=2 is out of range"),
        ({"documents": scored, "fusion": {"method": "rrf", "rrf_k": 0}}, 400, "rrf_k=0 is out of range"),
        ({"documents": scored, "fusion": "sum"}, 422, "use one of"),
        ({"documents": scored, "fusion": 5}, 422, "must be an object or a method name"),
        ({"documents": scored, "fusion": {"method": "blend", "alhpa": 0.3}}, 422, "unknown key 'alhpa'"),
        ({"documents": [{"text": "a", "first_stage_score": "1"}]}, 422, "must be a number or null"),
        ({"documents": [{"text": "a", "first_stage_score": 10**400}]}, 400, "not a finite number"),
    ]
    for path in ("/v1/rerank", mlcommons.PATH_LIST, mlcommons.PATH_SCORES):
        for extra, status, message in cases:
            reply = post_json(url, path, {"query": QUERY, **extra})
            assert reply.status == status, (path, extra, reply.body[:200])
            assert re.search(message, reply.json()["error"]["message"]), (path, extra)
    assert http_request(url, "GET", "/health").status == 200
    ok = post_json(url, "/v1/rerank", {"query": QUERY, "documents": scored, "fusion": "blend"})
    assert ok.status == 200 and ok.json()["fusion"] == {
        "method": "blend",
        "alpha": 0.5,
        "normalization": "minmax",
    }


def test_auto_reads_fusion_json_of_the_model_dir(
    server_factory, bert_ce_dir: Path, bert_scorer: Scorer, tmp_path: Path
) -> None:
    model = shutil.copytree(bert_ce_dir, tmp_path / "model")
    (model / "fusion.json").write_text(
        json.dumps(
            {"method": "blend", "alpha": 0.3, "normalization": "minmax", "rrf_k": 60, "chosen_on": "dev"}
        )
    )
    # The model loads from the copy, as in production, so the directory and the scorer agree.
    srv = server_factory(test_settings(model=str(model)))
    raw = _raw(bert_scorer)
    with RerankerClient(srv.target) as client:
        assert client.info().default_fusion.alpha == pytest.approx(0.3)
        _check_ranked(client.rerank(QUERY, DOCS), raw, FusionSpec(BLEND, alpha=0.3), FIRST)
    # A malformed file stops the start instead of serving something unintended.
    (model / "fusion.json").write_text('{"method": "blend", "alpha": 7}')
    broken = server_factory(test_settings(model=str(model)), scorer=bert_scorer, wait_loaded=False)
    with pytest.raises(ValueError, match=r"fusion\.json: fusion alpha=7 is out of range"):
        broken.call(broken._await_loaded())
