"""Contract tests: the exact bytes ml-commons sends and the exact parsing it does, against the real server.

The other side of the wire is restated in tests/opensearch/mlcommons_java.py from the Java classes
(CohereRerankPreProcessFunction, MLPostProcessFunction, CohereRerankPostProcessFunction,
ConnectorUtils, HttpConnector.createPayload, MLInferenceSearchResponseProcessor,
ByFieldRerankProcessor, DocumentContextSourceFetcher, json-smart's JSONParserBase).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from sidecar.opensearch import mlcommons, templates
from sidecar.scoring.base import Pair, Scorer
from tests.opensearch import mlcommons_java as J
from tests.opensearch.conftest import HttpServer, http_request
from tests.texts import documents, queries

QUERY = queries(1)[0]
DOCS = documents(12)
AWKWARD_QUERY = 'the "quoted" query / with \\ backslash, tab\t, newline\n, café, 日本, emoji \U0001f600'
AWKWARD_DOCS = [
    "a \"quoted\" doc with \\ and / and <html> & 'single' = signs",
    "line one\nline two\r\n\ttabbed \b\f control \x01 chars",
    "unicode: naïve café 日本語 \u2028 separator \U0001f9ec",
    '{"looks": "like json"}',
    "[1, 2, 3]",
]


def _connector_action(post: str) -> dict:
    cfg = templates.PluginConfig(post_process=post)  # type: ignore[arg-type]
    return templates.connector_body(cfg, "rerank")["actions"][0]


@pytest.mark.parametrize("post", ["default", "cohere"])
def test_rerank_connector_round_trip(sidecar_http: HttpServer, bert_scorer: Scorer, post: str) -> None:
    action = _connector_action(post)
    path = action["url"].removeprefix("http://127.0.0.1:8080")
    body = J.rerank_request_body(action["request_body"], QUERY, DOCS)
    # The body ml-commons builds is exactly this JSON, top_n being the number of documents.
    assert json.loads(body) == {"query": QUERY, "documents": DOCS, "top_n": len(DOCS)}
    reply = http_request(sidecar_http.url, "POST", path, body, action["headers"])
    assert reply.status == 200, reply.body[:300]
    scores = J.parse_rerank_response(action["post_process_function"], reply.body, len(DOCS))
    expected = bert_scorer.score([Pair(QUERY, d) for d in DOCS])
    # MLCommonsClientAccessor.inferenceSimilarity hands neural-search one float per input document, in
    # input order (batch padding moves float32 scores by an ulp or so, hence the tolerance).
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)


def test_default_function_reads_a_top_level_array_and_cohere_reads_results(sidecar_http: HttpServer) -> None:
    body = J.rerank_request_body(mlcommons.RERANK_REQUEST_BODY, QUERY, DOCS[:3])
    as_list = http_request(sidecar_http.url, "POST", mlcommons.PATH_LIST, body).body
    as_cohere = http_request(sidecar_http.url, "POST", mlcommons.PATH_COHERE, body).body
    assert isinstance(json.loads(as_list), list) and "results" in json.loads(as_cohere)
    # Crossing them fails inside ml-commons: that is why each function has its own path.
    with pytest.raises(J.IllegalArgumentException):
        J.parse_rerank_response(mlcommons.DEFAULT_POST_PROCESS, as_cohere, 3)
    with pytest.raises(J.IllegalArgumentException):
        J.parse_rerank_response(mlcommons.COHERE_POST_PROCESS, as_list, 3)


def test_awkward_text_survives_the_ml_commons_escaping(sidecar_http: HttpServer) -> None:
    """ml-commons escapes the query with commons-text escapeJson (\\/, \\uXXXX for non-ASCII) and
    gson-encodes the documents; the JSON-looking documents stay strings. The sidecar must read the same
    text as a plain JSON client sends: equal scores prove it."""
    body = J.rerank_request_body(mlcommons.RERANK_REQUEST_BODY, AWKWARD_QUERY, AWKWARD_DOCS)
    assert b"\\/" in body and b"\\u00E9" in body  # the escaping really happened
    assert json.loads(body)["query"] == AWKWARD_QUERY and json.loads(body)["documents"] == AWKWARD_DOCS
    via_ml_commons = J.parse_rerank_response(
        mlcommons.DEFAULT_POST_PROCESS,
        http_request(sidecar_http.url, "POST", mlcommons.PATH_LIST, body).body,
        len(AWKWARD_DOCS),
    )
    plain = json.dumps({"query": AWKWARD_QUERY, "documents": AWKWARD_DOCS}).encode()
    direct = http_request(sidecar_http.url, "POST", mlcommons.PATH_SCORES, plain).json()["scores"]
    assert via_ml_commons == direct


def test_every_score_literal_fits_json_smart(sidecar_http: HttpServer) -> None:
    """json-smart turns a float literal longer than 18 characters into a BigDecimal, which
    CohereRerankPostProcessFunction's (Double) cast rejects. Check the raw bytes, not the parsed value."""
    body = J.rerank_request_body(mlcommons.RERANK_REQUEST_BODY, QUERY, DOCS)
    for path in (mlcommons.PATH_LIST, mlcommons.PATH_COHERE):
        raw = http_request(sidecar_http.url, "POST", path, body).body.decode()
        literals = re.findall(r'"relevance_score":(-?[0-9.eE+-]+)', raw)
        indexes = re.findall(r'"index":(-?[0-9.eE+-]+)', raw)
        assert len(literals) == len(indexes) == len(DOCS)
        assert all(len(lit) <= 18 and ("." in lit or "e" in lit) for lit in literals), literals
        assert all(i.isdigit() for i in indexes)


def test_encode_score_keeps_float32_values_and_short_literals() -> None:
    rng = np.random.default_rng(7)
    values = np.concatenate(
        [
            rng.standard_normal(2000).astype(np.float32),
            (rng.random(2000) * 1e-4).astype(np.float32),  # sigmoid scores of irrelevant documents
            -(rng.random(500) * 1e-30).astype(np.float32),
            np.array([0.0, -0.0, 1.0, -1.0, 1e-45, 3.4e38, 0.1], dtype=np.float32),
        ]
    )
    for v in values:
        x = mlcommons.encode_score(float(v))
        assert len(repr(x)) <= 18 and np.float32(x) == v
        assert isinstance(J.json_smart_parse(repr(x)), J.JavaDouble)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            mlcommons.encode_score(bad)


def test_the_java_side_model_catches_what_would_break_the_cluster() -> None:
    """The emulation is strict where ml-commons is: a too-long float, an integer score, a float index,
    a missing or out-of-range entry all fail as they would in the cluster."""
    ok = b'[{"index":1,"relevance_score":0.5},{"index":0,"relevance_score":1.0}]'
    assert J.parse_rerank_response(mlcommons.DEFAULT_POST_PROCESS, ok, 2) == [1.0, 0.5]
    for bad, exc in [
        (b'[{"index":0,"relevance_score":0.12345678901234568}]', J.ClassCastException),  # 19 chars
        (b'[{"index":0,"relevance_score":1}]', J.ClassCastException),
        (b'[{"index":0.0,"relevance_score":1.0}]', J.ClassCastException),
        (b'[{"index":1,"relevance_score":1.0}]', J.ArrayIndexOutOfBoundsException),
        (b'[{"index":0,"relevance_score":1.0},{"index":0,"relevance_score":1.0}]', J.NullPointerException),
        (b'[{"idx":0,"relevance_score":1.0}]', J.IllegalArgumentException),
    ]:
        with pytest.raises(exc):
            J.parse_rerank_response(mlcommons.DEFAULT_POST_PROCESS, bad, 1 if bad.count(b"index") < 2 else 2)


def test_ml_inference_by_field_round_trip(sidecar_http: HttpServer, bert_scorer: Scorer) -> None:
    """Path B: ml_inference (many-to-one) sends the field values and the query from
    `ext.ml_inference.query_text`; the answer's `scores` list is split one per hit, in hit order, and
    rerank.by_field sorts by it, keeping the first-stage score."""
    cfg = templates.PluginConfig(fields=("text",))
    connector = templates.connector_body(cfg, "by_field")["actions"][0]
    pipeline = templates.pipeline_body(cfg, "by_field", "m1")["response_processors"]
    ml_inf, by_field = pipeline[0]["ml_inference"], pipeline[1]["rerank"]["by_field"]
    assert ml_inf["input_map"] == [{"documents": "text", "query": "_request.ext.ml_inference.query_text"}]
    # A search request with the query in ext, and BM25-ish hits.
    request = templates.search_body(cfg, "by_field", AWKWARD_QUERY)
    assert request["ext"] == {"ml_inference": {"query_text": AWKWARD_QUERY}}
    hits = [{"_id": str(i), "_score": 10.0 - i, "_source": {"text": d}} for i, d in enumerate(DOCS[:6])]
    # A multi-valued field arrives as a nested array.
    hits[2]["_source"]["text"] = [DOCS[2], "second value"]

    body = J.ml_inference_request_body(
        connector["request_body"],
        request["ext"]["ml_inference"]["query_text"],
        [h["_source"]["text"] for h in hits],
    )
    path = connector["url"].removeprefix("http://127.0.0.1:8080")
    reply = http_request(sidecar_http.url, "POST", path, body, connector["headers"])
    assert reply.status == 200, reply.body[:300]
    ((out_field, model_field),) = ml_inf["output_map"][0].items()
    per_hit = J.ml_inference_split(reply.body, model_field, len(hits))
    for h, s in zip(hits, per_hit, strict=True):
        h["_source"][out_field] = s
    reranked = J.by_field_rerank(hits, by_field["target_field"], by_field["keep_previous_score"])

    texts = [DOCS[0], DOCS[1], f"{DOCS[2]} second value", *DOCS[3:6]]
    expected = bert_scorer.score([Pair(AWKWARD_QUERY, t) for t in texts])
    assert [h["_score"] for h in reranked] == sorted((h["_score"] for h in reranked), reverse=True)
    for h in reranked:
        i = int(h["_id"])
        assert abs(h["_score"] - expected[i]) < 1e-5
        assert h["_source"]["previous_score"] == 10.0 - i and out_field not in h["_source"]


def test_text_similarity_smoke_request_is_what_the_rerank_model_expects() -> None:
    """`POST _plugins/_ml/_predict/text_similarity/<id>` takes {query_text, text_docs} (MLInput fields
    QUERY_TEXT_FIELD / TEXT_DOCS_FIELD); a remote model with parameters takes {parameters: {...}}."""
    method, path, body = templates.smoke_request("rerank", "abc")
    assert (method, path) == ("POST", "/_plugins/_ml/_predict/text_similarity/abc")
    assert set(body) == {"query_text", "text_docs"}
    method, path, body = templates.smoke_request("by_field", "abc")
    assert (method, path) == ("POST", "/_plugins/_ml/models/abc/_predict")
    assert set(body["parameters"]) == {"query", "documents"}


def test_rerank_processor_concatenates_fields_without_a_separator() -> None:
    """DocumentContextSourceFetcher appends each field with no separator: "title" + "text" glue the last
    word of the title to the first of the text. The indexer's `passage` field avoids it."""
    hit = {"_source": {"title": "Vaccines", "text": "train immunity", "tags": ["a", "b"]}}
    assert J.document_context(hit, ["title", "text"]) == "Vaccinestrain immunity"
    assert J.document_context(hit, ["tags", "missing"]) == "a b"
