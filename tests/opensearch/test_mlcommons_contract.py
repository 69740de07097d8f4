"""Score literals ml-commons can read: its JsonPath parses with json-smart in MODE_PERMISSIVE, where a float
literal longer than 18 characters becomes a BigDecimal and the rerank post-process's (Double) cast fails.
The rest of the contract (request bodies, escaping, both response shapes) runs against a real node in
test_real_cluster.py."""

from __future__ import annotations

import numpy as np
import pytest

from sidecar.opensearch import mlcommons


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
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            mlcommons.encode_score(bad)
