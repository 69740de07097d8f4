"""What ml-commons and neural-search do on their side of the wire, re-stated in Python for contract tests.

Each function names the Java class whose behaviour it restates (opensearch-project/ml-commons and
neural-search, 2.19 .. 3.x). Java types are kept where they decide success: json-smart (used by JsonPath)
yields Integer / Long / Double / BigDecimal, and `CohereRerankPostProcessFunction` casts with
`(Integer)` and `(Double)`, so a wrongly typed number is a ClassCastException in the cluster. This is not
our code: it is the other side of the contract, so the tests can speak it byte for byte.
"""

from __future__ import annotations

import json
import re
from typing import Any

# ---- Java number types as json-smart produces them (JSONParserBase, MODE_PERMISSIVE) -----------


class JavaInteger(int):
    pass


class JavaLong(int):
    pass


class JavaDouble(float):
    pass


class JavaBigDecimal(str):
    pass


class ClassCastException(Exception):
    pass


class ArrayIndexOutOfBoundsException(Exception):
    pass


class IllegalArgumentException(Exception):
    pass


class NullPointerException(Exception):
    pass


def _smart_int(literal: str) -> int:
    value = int(literal)
    return JavaInteger(value) if -(2**31) <= value < 2**31 else JavaLong(value)


def _smart_float(literal: str) -> float | str:
    # JSONParserBase.extractFloat: with USE_HI_PRECISION_FLOAT and BIG_DIGIT_UNRESTRICTED (both in
    # MODE_PERMISSIVE = -1), a literal longer than 18 characters is returned as a BigDecimal.
    if len(literal) > 18:
        return JavaBigDecimal(literal)
    return JavaDouble(float(literal))


def json_smart_parse(text: str) -> Any:
    """JsonPath.read(String, ...) parses with JsonSmartJsonProvider (json-smart, MODE_PERMISSIVE)."""
    return json.loads(text, parse_int=_smart_int, parse_float=_smart_float)


def json_path(document: Any, path: str) -> Any:
    """The two response filters MLPostProcessFunction uses for rerank: `$[*]` and `$.results`."""
    if path == "$[*]":
        if isinstance(document, list):
            return list(document)
        if isinstance(document, dict):  # a wildcard over an object yields its values
            return list(document.values())
        raise IllegalArgumentException("PathNotFoundException: $[*] on a scalar")
    if path == "$.results":
        if isinstance(document, dict) and "results" in document:
            return document["results"]
        raise IllegalArgumentException("PathNotFoundException: No results for path: $['results']")
    raise NotImplementedError(path)


# ---- request side ------------------------------------------------------------------------------


def gson_to_json(value: Any) -> str:
    """StringUtils.gson (GsonBuilder().disableHtmlEscaping()) .toJson for strings, ints and lists of those."""
    if isinstance(value, list):
        return "[" + ",".join(gson_to_json(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        out = ['"']
        for ch in value:
            code = ord(ch)
            if ch == '"':
                out.append('\\"')
            elif ch == "\\":
                out.append("\\\\")
            elif ch in "\t\b\n\r\f":
                out.append({"\t": "\\t", "\b": "\\b", "\n": "\\n", "\r": "\\r", "\f": "\\f"}[ch])
            elif code < 0x20 or ch in "\u2028\u2029":
                out.append(f"\\u{code:04x}")
            else:
                out.append(ch)
        out.append('"')
        return "".join(out)
    raise NotImplementedError(type(value))


def commons_escape_json(value: str) -> str:
    """commons-text StringEscapeUtils.escapeJson, as ConnectorUtils.escapeRemoteInferenceInputData uses it."""
    out = []
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "/":
            out.append("\\/")
        elif ch in "\b\n\t\f\r":
            out.append({"\b": "\\b", "\n": "\\n", "\t": "\\t", "\f": "\\f", "\r": "\\r"}[ch])
        elif code < 32 or code > 0x7F:
            if code > 0xFFFF:  # JavaUnicodeEscaper writes supplementary characters as a surrogate pair
                code -= 0x10000
                out.append(f"\\u{0xD800 + (code >> 10):04X}\\u{0xDC00 + (code & 0x3FF):04X}")
            else:
                out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    return "".join(out)


def is_json_object_or_array(value: str) -> bool:
    """StringUtils.isJson: parses as a JSONObject or JSONArray (and then with gson)."""
    try:
        parsed = json.loads(value)
    except ValueError:
        return False
    return isinstance(parsed, dict | list)


def escape_parameters(params: dict[str, str]) -> dict[str, str]:
    """ConnectorUtils.escapeRemoteInferenceInputData: escape every value that is not already JSON."""
    return {k: v if is_json_object_or_array(v) else commons_escape_json(v) for k, v in params.items()}


def substitute(template: str, params: dict[str, str]) -> str:
    """HttpConnector.createPayload: StringSubstitutor(parameters, "${parameters.", "}")."""
    return re.sub(
        r"\$\{parameters\.([A-Za-z0-9_.]+)\}", lambda m: params.get(m.group(1), m.group(0)), template
    )


def rerank_request_body(template: str, query: str, documents: list[str]) -> bytes:
    """The bytes the connector POSTs for a TextSimilarityInputDataSet (the rerank processor, or
    _predict/text_similarity): CohereRerankPreProcessFunction (which both
    `connector.pre_process.default.rerank` and `connector.pre_process.cohere.rerank` map to in
    MLPreProcessFunction) builds
    {query, documents (gson JSON), top_n (= number of documents)}; convertScriptStringToJsonString keeps
    strings raw and gson-encodes the rest."""
    params = {"query": query, "documents": gson_to_json(documents), "top_n": gson_to_json(len(documents))}
    return substitute(template, escape_parameters(params)).encode("utf-8")


def ml_inference_request_body(template: str, query: str, field_values: list[Any]) -> bytes:
    """MLInferenceSearchResponseProcessor, many-to-one: the hits' field values collected into a list
    (updateModelInputParameters) and the query read from the request (toJson(String) is the raw string);
    StringUtils.getParameterMap gson-encodes non-strings; no pre-process function (the connector has none)."""
    params = {"query": query, "documents": gson_to_json(field_values)}
    return substitute(template, escape_parameters(params)).encode("utf-8")


# ---- response side -----------------------------------------------------------------------------


def cohere_rerank_post_process(filtered: Any) -> list[float]:
    """CohereRerankPostProcessFunction.validate + process: one ModelTensor per entry, placed by index."""
    if not isinstance(filtered, list):
        raise IllegalArgumentException("Post process function input is not a List.")
    if filtered:
        if not isinstance(filtered[0], dict):
            raise IllegalArgumentException("Post process function input is not a List of Map.")
        if not filtered[0] or "index" not in filtered[0] or "relevance_score" not in filtered[0]:
            raise IllegalArgumentException("The rerank result should contain index and relevance_score.")
    scores: list[float | None] = [None] * len(filtered)
    for entry in filtered:
        index, score = entry.get("index"), entry.get("relevance_score")
        if not isinstance(index, JavaInteger):
            raise ClassCastException(f"{type(index).__name__} cannot be cast to java.lang.Integer: {index!r}")
        if not isinstance(score, JavaDouble):
            raise ClassCastException(f"{type(score).__name__} cannot be cast to java.lang.Double: {score!r}")
        if not 0 <= index < len(scores):
            raise ArrayIndexOutOfBoundsException(f"Index {index} out of bounds for length {len(scores)}")
        scores[index] = float(score)
    return [s if s is not None else _npe() for s in scores]


def _npe() -> float:
    # A document without an entry leaves a null Double; neural-search's floatValue() then throws.
    raise NullPointerException("a document got no relevance_score")


def parse_rerank_response(post_process_function: str, body: bytes, n_documents: int) -> list[float]:
    """ConnectorUtils.processOutput for a built-in rerank post-process function, then
    MLCommonsClientAccessor.inferenceSimilarity (one float per document, in input order)."""
    from sidecar.opensearch.mlcommons import RESPONSE_FILTER

    filtered = json_path(json_smart_parse(body.decode("utf-8")), RESPONSE_FILTER[post_process_function])
    scores = cohere_rerank_post_process(filtered)
    if len(scores) != n_documents:
        # RerankProcessor pairs scores with hits by position.
        raise IllegalArgumentException(f"{len(scores)} scores for {n_documents} hits")
    return scores


def ml_inference_split(body: bytes, output_field: str, n_hits: int) -> list[Any]:
    """No post-process function: the JSON answer becomes dataAsMap (gson: numbers are Doubles); the
    output_map field is read from it and, being a list as long as the hits, split one element per hit
    (MLInferenceSearchResponseProcessor); otherwise every hit would get the whole value."""
    data = json.loads(body.decode("utf-8"))
    value = data[output_field]
    if isinstance(value, list) and len(value) == n_hits:
        return list(value)
    return [value] * n_hits


def by_field_rerank(
    hits: list[dict[str, Any]], target_field: str, keep_previous_score: bool = True
) -> list[dict]:
    """ByFieldRerankProcessor: score = the numeric target field, previous _score kept, target removed,
    hits re-sorted by the new score (descending)."""
    out = []
    for hit in hits:
        source = dict(hit["_source"])
        value = source.pop(target_field)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise IllegalArgumentException(f"The field mapping to rerank by [{value}] is not Numerical")
        if keep_previous_score:
            source["previous_score"] = hit["_score"]
        out.append({**hit, "_score": float(value), "_source": source})
    return sorted(out, key=lambda h: -h["_score"])


def document_context(hit: dict[str, Any], fields: list[str]) -> str:
    """DocumentContextSourceFetcher: each field's value appended with NO separator; list values joined
    with a space; a missing field contributes an empty string."""
    parts = []
    for f in fields:
        value: Any = hit.get("_source", {})
        for key in f.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, list):
            parts.append(" ".join(str(v) for v in value))
        elif value is not None:
            parts.append(str(value))
    return "".join(parts)
