"""The rendered OpenSearch bodies: version gates, endpoint regexes, timeouts in whole seconds, pipelines."""

from __future__ import annotations

import re

import pytest

from sidecar.opensearch import mlcommons
from sidecar.opensearch import templates as T


def test_versions() -> None:
    assert T.version_tuple("2.19.1") == (2, 19, 1)
    assert T.version_tuple("3.0.0-SNAPSHOT") == (3, 0, 0)
    assert T.version_tuple("3.1") == (3, 1, 0)
    T.check_version("2.19.0")
    T.check_version("3.8.0")
    for old in ("2.18.0", "2.12.1", "1.3.20"):
        with pytest.raises(T.UnsupportedVersion, match=r"2\.19"):
            T.check_version(old)


def test_previous_score_field_is_gated_on_3_8() -> None:
    with pytest.raises(T.UnsupportedVersion):
        T.PluginConfig(previous_score_field="bm25", opensearch_version="3.7.0")
    cfg = T.PluginConfig(previous_score_field="bm25", opensearch_version="3.8.0")
    by_field = T.pipeline_body(cfg, "by_field")["response_processors"][1]["rerank"]["by_field"]
    assert by_field["previous_score_field"] == "bm25"
    plain = T.pipeline_body(T.PluginConfig(), "by_field")["response_processors"][1]["rerank"]["by_field"]
    assert "previous_score_field" not in plain and plain["keep_previous_score"] is True


@pytest.mark.parametrize(
    ("url", "matches", "refuses"),
    [
        (
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/v1/opensearch/rerank",
            "http://127.0.0.10:8080/v1/rerank",
        ),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1/rerank", "http://127x0x0x1:8080/v1/rerank"),
        (
            "https://rerank.example.com",
            "https://rerank.example.com/v1/rerank",
            "https://rerank.example.com.evil/x",
        ),
        (
            "http://reranker:8080/base",
            "http://reranker:8080/base/v1/rerank",
            "http://reranker:8081/v1/rerank",
        ),
    ],
)
def test_endpoint_regex_matches_only_this_origin(url: str, matches: str, refuses: str) -> None:
    regex = T.endpoint_regex(url)
    assert re.match(regex, matches) and not re.match(regex, refuses)


def test_private_addresses() -> None:
    for url in (
        "http://127.0.0.1:8080",
        "http://localhost:8080",
        "http://10.1.2.3",
        "http://192.168.0.4",
        "http://reranker:8080",
        "http://rr.default.svc",
        "http://[::1]:8080",
    ):
        assert T.needs_private_ip(url), url
    for url in ("https://rerank.example.com", "http://8.8.8.8"):
        assert not T.needs_private_ip(url), url
    body = T.cluster_settings(T.PluginConfig(sidecar_url="https://rerank.example.com"), ["^a$"])
    assert body == {
        "persistent": {T.TRUSTED_ENDPOINTS: ["^a$", T.endpoint_regex("https://rerank.example.com")]}
    }


def test_config_validation() -> None:
    for bad in (
        {"read_timeout_s": 2.5},
        {"connection_timeout_s": 0},
        {"read_timeout_s": True},
        {"fields": ()},
        {"fields": ("a,b",)},
        {"sidecar_url": "127.0.0.1:8080"},
        {"sample_factor": 0.5},
        {"max_retry_times": -1},
    ):
        with pytest.raises(ValueError):
            T.PluginConfig(**bad)  # type: ignore[arg-type]


def test_connectors_carry_whole_second_timeouts_and_a_deadline_header() -> None:
    cfg = T.PluginConfig(connection_timeout_s=1, read_timeout_s=3, max_connection=8)
    for kind in T.KINDS:
        body = T.connector_body(cfg, kind)
        assert body["client_config"] == {
            "max_connection": 8,
            "connection_timeout": 1,
            "read_timeout": 3,
            "max_retry_times": 0,
        }
        assert body["actions"][0]["headers"][mlcommons.TIMEOUT_HEADER] == "2750"
    rerank = T.connector_body(cfg, "rerank")["actions"][0]
    assert rerank["url"].endswith(mlcommons.PATH_LIST)
    assert rerank["pre_process_function"] == mlcommons.DEFAULT_PRE_PROCESS
    assert rerank["post_process_function"] == mlcommons.DEFAULT_POST_PROCESS
    cohere = T.connector_body(T.PluginConfig(post_process="cohere"), "rerank")["actions"][0]
    assert cohere["url"].endswith(mlcommons.PATH_COHERE)
    assert cohere["post_process_function"] == mlcommons.COHERE_POST_PROCESS
    scores = T.connector_body(cfg, "by_field")["actions"][0]
    assert scores["url"].endswith(mlcommons.PATH_SCORES)
    assert "pre_process_function" not in scores and "post_process_function" not in scores


def test_window_and_failure_policy() -> None:
    cfg = T.PluginConfig(sample_factor=3.0, ignore_failure=True)
    for kind in T.KINDS:
        body = T.pipeline_body(cfg, kind, "m")
        assert body["request_processors"] == [{"oversample": {"sample_factor": 3.0, "tag": "rerank-window"}}]
        assert list(body["response_processors"][-1]) == ["truncate_hits"]
        reranking = body["response_processors"][:-1]
        assert all(next(iter(p.values()))["ignore_failure"] is True for p in reranking)
    plain = T.pipeline_body(T.PluginConfig(), "rerank", "m")
    assert "request_processors" not in plain and len(plain["response_processors"]) == 1


def test_search_bodies() -> None:
    one = T.PluginConfig(fields=("passage",))
    assert T.search_body(one, "rerank", "q")["query"] == {"match": {"passage": "q"}}
    assert T.search_body(one, "rerank", "q")["ext"] == {"rerank": {"query_context": {"query_text": "q"}}}
    assert T.search_body(T.PluginConfig(), "by_field", "q")["ext"] == {"ml_inference": {"query_text": "q"}}


def test_render_all_is_ordered_and_complete() -> None:
    names = [r.filename for r in T.render_all(T.PluginConfig())]
    assert names == sorted(names) and len(names) == 12
    assert [r.filename for r in T.render_all(T.PluginConfig(), ("by_field",))][
        -1
    ] == "07-by-field-search.json"
