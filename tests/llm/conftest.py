"""Tiny causal-LM rerankers built from transformers configs and tokenizers trained here (no downloads).

Directory names carry the family, as hub ids do, so `--llm-family auto` is exercised too.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def llm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from sidecar.model_factory import (
        build_causal_lm,
        build_erank_like,
        build_llm_tokenizer,
        llm_tokenizer_corpus,
    )

    root = tmp_path_factory.mktemp("llm")
    corpus = llm_tokenizer_corpus()
    out = {}
    qwen3 = root / "Qwen3-Reranker-tiny"
    out["qwen3-reranker"] = build_causal_lm(qwen3, build_llm_tokenizer(qwen3, corpus), arch="qwen3", seed=1)
    mxbai = root / "mxbai-rerank-tiny-v2"
    out["mxbai-rerank-v2"] = build_causal_lm(mxbai, build_llm_tokenizer(mxbai, corpus), arch="qwen2", seed=2)
    bge = root / "bge-reranker-v2-gemma-tiny"
    out["bge-reranker-v2-gemma"] = build_causal_lm(
        bge, build_llm_tokenizer(bge, corpus, bos=True), arch="qwen2", seed=3
    )
    out["erank"] = build_erank_like(root / "ERank-tiny", seed=4)
    return out
