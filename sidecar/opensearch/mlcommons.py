"""What ml-commons sends to the sidecar and how it parses the answer: the pinned facts, in one place.

Read from opensearch-project/ml-commons (2.19 .. 3.x) and neural-search; the class names let a reader check:
- `MLPreProcessFunction`: `connector.pre_process.default.rerank` and `connector.pre_process.cohere.rerank`
  both map to `CohereRerankPreProcessFunction`, which turns a `TextSimilarityInputDataSet` into the
  parameters `query` (the raw string), `documents` (gson JSON array of strings) and `top_n` (the number of
  documents); the connector's `request_body` template then builds the HTTP body.
- `MLPostProcessFunction`: `connector.post_process.default.rerank` reads the response with JsonPath `$[*]`
  (a top-level JSON array), `connector.post_process.cohere.rerank` with `$.results`; both then run
  `CohereRerankPostProcessFunction`, which does `scores[(Integer) index] = (Double) relevance_score` into an
  array sized by the number of entries: one entry per input document, `index` an integer, the score a float.
- JsonPath parses with json-smart in `MODE_PERMISSIVE`, where a float literal longer than 18 characters
  becomes a `BigDecimal` (`JSONParserBase.extractFloat`), so the `(Double)` cast fails. `encode_score`
  keeps every score literal within 18 characters.
- `MLInferenceSearchResponseProcessor` (ml_inference, many-to-one) sends the hits' field values as a JSON
  array and the query read from the search request (`_request.ext.ml_inference.query_text`, 2.19+); with no
  post-process function the JSON answer becomes the model output, and a list output as long as the hits
  is split one element per hit, in hit order.
"""

from __future__ import annotations

import math

DEFAULT_PRE_PROCESS = "connector.pre_process.default.rerank"
DEFAULT_POST_PROCESS = "connector.post_process.default.rerank"
COHERE_PRE_PROCESS = "connector.pre_process.cohere.rerank"
COHERE_POST_PROCESS = "connector.post_process.cohere.rerank"
# JsonPath each post-process function applies to the response before parsing (MLPostProcessFunction).
RESPONSE_FILTER = {DEFAULT_POST_PROCESS: "$[*]", COHERE_POST_PROCESS: "$.results"}

# The connector request bodies. `${parameters.query}` is JSON-escaped by ml-commons
# (ConnectorUtils.escapeRemoteInferenceInputData) unless it is itself a JSON object or array;
# `documents` arrives as a JSON array and is substituted raw.
RERANK_REQUEST_BODY = (
    '{ "query": "${parameters.query}", "documents": ${parameters.documents}, "top_n": ${parameters.top_n} }'
)
SCORES_REQUEST_BODY = '{ "query": "${parameters.query}", "documents": ${parameters.documents} }'

# Sidecar paths, one per answer shape.
PATH_COHERE = "/v1/rerank"  # {"results": [{index, relevance_score}]}: Cohere clients, cohere.rerank
PATH_LIST = "/v1/opensearch/rerank"  # [{index, relevance_score}]: connector.post_process.default.rerank
PATH_SCORES = "/v1/opensearch/scores"  # {"scores": [...]} in input order: ml_inference + rerank.by_field

# json-smart returns a BigDecimal (not a Double) for float literals longer than this.
MAX_FLOAT_LITERAL = 18
# The header a connector sets so the sidecar gives up (and answers) before the connector's read_timeout.
TIMEOUT_HEADER = "x-rerank-timeout-ms"


def encode_score(x: float) -> float:
    """The float closest to `x` whose JSON literal (Python repr) has at most 18 characters.

    Scores are float32 from the model, so this never changes their float32 value; it only drops
    digits beyond double precision that ml-commons could not parse as a Double.
    """
    if not math.isfinite(x):
        raise ValueError(f"score {x!r} is not finite")
    x = float(x)
    if len(repr(x)) <= MAX_FLOAT_LITERAL:
        return x
    for digits in range(16, 0, -1):
        y = float(f"{x:.{digits}g}")
        if len(repr(y)) <= MAX_FLOAT_LITERAL:
            return y
    raise AssertionError("unreachable: a 1-digit float fits in 18 characters")
