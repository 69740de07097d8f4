"""A causal-LM reranker packaged for sentence-transformers >= 5.4 (chat template + LogitScore head) is
served through sentence-transformers itself (the cross-encoder backend), not re-implemented: scores equal
`CrossEncoder.predict` (the instruction is predict's `prompt`), and, since the chat template built here
is Qwen3-Reranker's, they also equal the sidecar's own qwen3-reranker family on the same weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_scorer
from tests.llm.test_llm_rerankers import INSTRUCTION, TOL, _compositions, _pairs

# Qwen3-Reranker's prompt as a chat template over sentence-transformers' roles: the system message
# (predict's `prompt`) is the instruction.
QWEN3_CHAT_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    '<Instruct>: {{ (messages | selectattr("role", "eq", "system") | map(attribute="content") | first) '
    'or "Given a web search query, retrieve relevant passages that answer the query" }}\n'
    '<Query>: {{ messages | selectattr("role", "eq", "query") | map(attribute="content") | first }}\n'
    '<Document>: {{ messages | selectattr("role", "eq", "document") | map(attribute="content") | first }}'
    # Three newlines: Jinja drops a template's final one, and the prompt ends with two.
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n\n"
)


@pytest.fixture(scope="module")
def st_reranker_dir(llm_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder.modules import LogitScore, Transformer
    from transformers import AutoTokenizer

    src = tmp_path_factory.mktemp("st") / "backbone"
    shutil.copytree(llm_dirs["qwen3-reranker"], src)
    tok = AutoTokenizer.from_pretrained(str(src))
    yes, no = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no"))
    transformer = Transformer(
        str(src),
        transformer_task="text-generation",
        processor_kwargs={"chat_template": QWEN3_CHAT_TEMPLATE},
        model_kwargs={"dtype": torch.float32},
    )
    out = src.parent / "st-chat-reranker"
    CrossEncoder(modules=[transformer, LogitScore(yes, no)], device="cpu").save(str(out))
    return out


def test_logit_score_cross_encoder_is_served_through_sentence_transformers(
    st_reranker_dir: Path, llm_dirs: dict[str, Path]
) -> None:
    from sentence_transformers import CrossEncoder

    scorer = make_scorer(st_reranker_dir, dtype="float32")
    assert scorer.info.backend == "cross-encoder" and scorer.accepts_instruction
    reference = CrossEncoder(str(st_reranker_dir), device="cpu")
    plain, instructed = _pairs(), _pairs(instruction=INSTRUCTION)
    want_plain = reference.predict([(p.query, p.document) for p in plain])
    want_instructed = reference.predict([(p.query, p.document) for p in instructed], prompt=INSTRUCTION)
    for name, scores in _compositions(scorer, plain).items():
        np.testing.assert_allclose(scores, want_plain, atol=TOL, rtol=0, err_msg=name)
    mixed = [p if i % 2 else instructed[i] for i, p in enumerate(plain)]
    want_mixed = np.where(np.arange(len(plain)) % 2 == 1, want_plain, want_instructed)
    np.testing.assert_allclose(scorer.score(mixed), want_mixed, atol=TOL, rtol=0)
    assert np.max(np.abs(want_plain - want_instructed)) > 1e-3
    # The same weights through the sidecar's own qwen3-reranker family give the same probabilities.
    own = make_scorer(llm_dirs["qwen3-reranker"], dtype="float32")
    np.testing.assert_allclose(own.score(plain), want_plain, atol=TOL, rtol=0)
    np.testing.assert_allclose(own.score(instructed), want_instructed, atol=TOL, rtol=0)
    # The budget sees the template's tokens too.
    assert all(
        m.tokens > len(p.query.split()) + 30 for m, p in zip(scorer.measure(plain), plain, strict=True)
    )
