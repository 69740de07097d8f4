"""`replay --instruction`: the evaluator sends the instruction on every request (gRPC and HTTP), the
sidecar's LLM reranker scores with it, and the run's description reports it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sidecar.cli import build_parser
from sidecar.eval.cli import _validate
from sidecar.eval.datasets import CorpusDoc
from sidecar.eval.rerankers import GrpcReranker, HttpReranker
from sidecar.scoring.base import Pair
from tests.conftest import test_settings
from tests.llm.test_llm_rerankers import INSTRUCTION, TOL, reference_logit_scores
from tests.texts import documents, queries


def test_replay_rerankers_send_the_instruction(server_factory, llm_dirs: dict[str, Path]) -> None:
    path = llm_dirs["qwen3-reranker"]
    srv = server_factory(test_settings(model=str(path), dtype="float32", warmup=False))
    query = queries(1)[0]
    candidates = [(f"d{i}", CorpusDoc(title="", text=t[:300]), 10.0 - i) for i, t in enumerate(documents(4))]
    expected = {
        instruction: reference_logit_scores(
            "qwen3-reranker", path, [Pair(query, doc.text, instruction) for _, doc, _ in candidates]
        )
        for instruction in (None, INSTRUCTION)
    }
    rerankers = [
        GrpcReranker(srv.target, instruction=INSTRUCTION),
        HttpReranker(f"http://127.0.0.1:{srv.server.http_port}", instruction=INSTRUCTION),
        GrpcReranker(srv.target),
    ]
    try:
        for reranker in rerankers:
            out = reranker.rerank(query, candidates)
            got = dict(out.ranking)
            want = expected[reranker.instruction]
            np.testing.assert_allclose(
                [got[f"d{i}"] for i in range(len(candidates))], want, atol=TOL, rtol=0, err_msg=reranker.name
            )
        assert rerankers[0].describe()["instruction"] == INSTRUCTION
        assert "instruction" not in rerankers[2].describe()
    finally:
        for reranker in rerankers:
            reranker.close()
    assert np.max(np.abs(expected[None] - expected[INSTRUCTION])) > 1e-3


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--api", "none", "--instruction", "x"], "--instruction needs --api grpc or http"),
        (["--instruction", "x"], None),
    ],
)
def test_replay_instruction_option(argv: list[str], problem: str | None) -> None:
    args = build_parser().parse_args(["replay", *argv])
    assert args.instruction == "x"
    message = _validate(args)
    assert (message is None) if problem is None else (problem in (message or ""))
