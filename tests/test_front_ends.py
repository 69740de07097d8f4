"""The front ends only translate: one `Info` built by the service, one exception path per transport
(a gRPC interceptor, an aiohttp middleware). Real servers on ephemeral ports, real clients."""

from __future__ import annotations

import grpc
import pytest

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar.client import RerankerClient
from sidecar.errors import GENERIC_INTERNAL_MESSAGE
from sidecar.fusion_pb import fusion_from_proto
from sidecar.scoring.base import Scorer
from tests.conftest import test_settings
from tests.fakes import InfoFailingScorer
from tests.opensearch.conftest import http_request


def test_http_info_carries_every_grpc_info_field_with_the_same_value(
    server_factory, bert_scorer: Scorer
) -> None:
    # Non-default limits and fusion, so a front end reporting a default instead of the setting shows.
    settings = test_settings(
        max_batch_tokens=4096,
        max_batch_pairs=17,
        max_documents=333,
        max_queue_pairs=4444,
        max_body_bytes=123456,
        fusion="rrf",
        fusion_rrf_k=7,
    )
    srv = server_factory(settings, scorer=bert_scorer)
    with RerankerClient(srv.target) as client:
        grpc_info = client.info()
    reply = http_request(f"http://127.0.0.1:{srv.server.http_port}", "GET", "/v1/info")
    assert reply.status == 200
    http_info = reply.json()

    names = [f.name for f in pb.InfoResponse.DESCRIPTOR.fields]
    assert sorted(http_info) == sorted(names)
    for name in names:
        if name == "default_fusion":
            spec = fusion_from_proto(grpc_info.default_fusion)
            assert spec is not None and http_info[name] == spec.to_dict() == {"method": "rrf", "rrf_k": 7}
        else:
            assert http_info[name] == getattr(grpc_info, name), name
    # The values are the server's, not just equal to each other.
    model = bert_scorer.info
    assert (grpc_info.model_id, grpc_info.attention, grpc_info.max_length) == (
        model.model_id,
        model.attention,
        model.max_length,
    )
    assert (grpc_info.max_batch_tokens, grpc_info.max_batch_pairs, grpc_info.max_documents) == (4096, 17, 333)
    assert (grpc_info.max_queue_pairs, grpc_info.max_body_bytes, grpc_info.ready) == (4444, 123456, True)


def test_info_while_draining_says_not_ready_on_both_front_ends(server_factory, bert_scorer: Scorer) -> None:
    srv = server_factory(scorer=bert_scorer)
    srv.server.service.begin_drain()
    with RerankerClient(srv.target) as client:
        assert client.info().ready is False
    http_info = http_request(f"http://127.0.0.1:{srv.server.http_port}", "GET", "/v1/info").json()
    assert http_info["ready"] is False


def test_an_unexpected_error_is_internal_with_a_generic_message_on_both_front_ends(
    server_factory, bert_scorer: Scorer, caplog: pytest.LogCaptureFixture
) -> None:
    scorer = InfoFailingScorer(bert_scorer)
    srv = server_factory(scorer=scorer)
    scorer.fail = True
    with RerankerClient(srv.target) as client, pytest.raises(grpc.RpcError) as err:
        client.info()
    assert err.value.code() == grpc.StatusCode.INTERNAL  # not UNKNOWN with the exception's text
    assert err.value.details() == GENERIC_INTERNAL_MESSAGE
    reply = http_request(f"http://127.0.0.1:{srv.server.http_port}", "GET", "/v1/info")
    assert reply.status == 500
    assert reply.json()["error"] == {"code": "internal", "message": GENERIC_INTERNAL_MESSAGE, "status": 500}
    assert InfoFailingScorer.SECRET.encode() not in reply.body
    # The details are in the log, with the traceback, once per transport.
    logged = [r for r in caplog.records if r.levelname == "ERROR" and r.exc_info]
    assert len(logged) == 2 and all(InfoFailingScorer.SECRET in str(r.exc_info[1]) for r in logged)
    # The server keeps serving.
    scorer.fail = False
    with RerankerClient(srv.target) as client:
        assert client.info().model_id == bert_scorer.info.model_id
