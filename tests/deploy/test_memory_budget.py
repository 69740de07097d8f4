"""The shipped manifests' memory limit holds the sidecar with its settings: the process with its model,
the embedding cache, and max-size requests in flight (figures measured with scripts/memory_bench.py,
README "Bounded work per request")."""

from __future__ import annotations

import pytest
from deploy_support import containers, env_values, pod_spec, reranker_pods, settings_from_env, variants

PROCESS_MIB = 1200  # peak RSS of `serve` with the packaged model, warmed up (measured: 1,160-1,180 MiB)
PER_REQUEST_BODY_FACTOR = 5  # peak RSS growth per large request in flight / its size (measured 4.8x)
PER_REQUEST_MIB = 16  # plus a fixed part per request (measured: 16 MiB for a 1 MiB body)
CONCURRENT_MAX_SIZE_REQUESTS = 16  # what the default must allow: an OpenSearch node's search threads

_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def _bytes(quantity: str) -> int:
    for suffix, factor in _UNITS.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


@pytest.mark.parametrize("variant", sorted(variants()))
def test_memory_limit_holds_the_model_cache_and_max_size_requests(variant: str) -> None:
    for doc in reranker_pods(variants()[variant]):
        c = next(c for c in containers(pod_spec(doc)) if c["name"] == "reranker")
        settings = settings_from_env({k: v for k, v in env_values(c).items() if v is not None})
        limit = _bytes(c["resources"]["limits"]["memory"])
        per_request = PER_REQUEST_BODY_FACTOR * settings.max_body_bytes + (PER_REQUEST_MIB << 20)
        need = (PROCESS_MIB << 20) + settings.embedding_cache_bytes
        need += CONCURRENT_MAX_SIZE_REQUESTS * per_request
        assert need <= limit, (
            f"{variant}: {need / 2**30:.2f} GiB needed for {CONCURRENT_MAX_SIZE_REQUESTS} max-size requests "
            f"of {settings.max_body_bytes} bytes, limit {limit / 2**30:.2f} GiB"
        )
