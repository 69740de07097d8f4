"""LLM pointwise rerankers: the sidecar's scores equal an independent reference computed here with plain
transformers (a forward pass per pair, or `generate` with `output_scores`), written from each family's
reference code (cited in sidecar/scoring/prompts.py), whatever the batch composition and padding.

Tolerance: 1e-4 absolute, float32 pinned (bf16 would differ by ~1e-2).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sidecar.scoring.base import Pair, Scorer
from tests.conftest import make_scorer
from tests.texts import documents, queries

TOL = 1e-4
INSTRUCTION = "Find passages that state a measured result"

# Facts from the references (model cards / reference code), restated here so the reference below does not
# depend on the sidecar's own template module.
QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_DEFAULT = "Given a web search query, retrieve relevant passages that answer the query"
MXBAI_PREFIX = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
)
MXBAI_TASK = (
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your "
    "binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)
MXBAI_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
BGE_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by "
    "providing a prediction of either 'Yes' or 'No'."
)
ERANK_PROMPT = """Given a query and a document, please give a relevance score of 0~10.
The goal or relevance definition is: {instruction}

Here is the query:
{query}

Here is the document:
{doc}

After thinking, directly choose a relevance score from [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10].
- 0 represents completely not related
- 10 means perfectly related.

Desired output format:
<think>put your thinking here</think><answer>Only allows an integer here</answer>

Your output:"""
BGE_MAX_LENGTH = 64  # small, so the reference's truncation rules are exercised
ERANK_NEW_TOKENS = 12


def _pairs(n_docs: int = 4, instruction: str | None = None) -> list[Pair]:
    docs = [d[:400] for d in documents(n_docs)]
    return [Pair(q, d, instruction) for q in queries(2) for d in docs]


def _load(path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return tok, model


def _ids(tok, text: str, **kw) -> list[int]:  # type: ignore[no-untyped-def]
    return tok(text, add_special_tokens=False, **kw)["input_ids"]


def _only_second(first: list[int], second: list[int], max_length: int) -> list[int]:
    """`tokenizer.prepare_for_model(first, second, truncation="only_second", max_length=...)` of
    transformers 4 (which both references call; transformers 5 removed it): the second sequence loses
    tokens from its end until the pair fits."""
    return first + second[: max(0, max_length - len(first))]


def _last_logits(model, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def reference_logit_scores(family: str, path: Path, pairs: list[Pair]) -> np.ndarray:
    """One unpadded forward pass per pair, prompts built as each family's reference code builds them."""
    tok, model = _load(path)
    out = []
    for p in pairs:
        if family == "qwen3-reranker":
            prefix, suffix = _ids(tok, QWEN3_PREFIX), _ids(tok, QWEN3_SUFFIX)
            text = (
                f"<Instruct>: {p.instruction or QWEN3_DEFAULT}\n<Query>: {p.query}\n<Document>: {p.document}"
            )
            body = _ids(tok, text, truncation=True, max_length=8192 - len(prefix) - len(suffix))
            logits = _last_logits(model, prefix + body + suffix)
            yes, no = _ids(tok, "yes")[0], _ids(tok, "no")[0]
            out.append(torch.softmax(torch.stack([logits[no], logits[yes]]), 0)[1].item())
        elif family == "mxbai-rerank-v2":
            sep, task = _ids(tok, "\n"), _ids(tok, MXBAI_TASK)
            prefix, suffix = _ids(tok, MXBAI_PREFIX), _ids(tok, MXBAI_SUFFIX)
            fixed = len(prefix) + len(task) + len(suffix) + len(sep)
            max_length = min(8192, tok.model_max_length - fixed)
            q_text = f"query: {p.query}"
            if p.instruction:
                q_text = f"instruction: {p.instruction}\n{q_text}"
            q = _ids(tok, q_text, max_length=max_length * 3 // 4, truncation=True)
            d = _ids(
                tok,
                f"document: {p.document}",
                max_length=min(tok.model_max_length - len(q) - fixed, max_length),
                truncation=True,
            )
            item = _only_second(q, sep + d, max_length)
            logits = _last_logits(model, prefix + item + sep + task + suffix)
            out.append((logits[_ids(tok, "1")[0]] - logits[_ids(tok, "0")[0]]).item())
        else:  # bge-reranker-v2-gemma
            sep, prompt = _ids(tok, "\n"), _ids(tok, p.instruction or BGE_PROMPT)
            q = _ids(tok, f"A: {p.query}", max_length=BGE_MAX_LENGTH * 3 // 4, truncation=True)
            d = _ids(tok, f"B: {p.document}", max_length=BGE_MAX_LENGTH, truncation=True)
            item = _only_second([tok.bos_token_id, *q], sep + d, BGE_MAX_LENGTH + len(sep) + len(prompt))
            logits = _last_logits(model, item + sep + prompt)
            out.append(logits[_ids(tok, "Yes")[0]].item())
    return np.asarray(out, dtype=np.float64)


def reference_erank_scores(
    path: Path, pairs: list[Pair], forced: bool = False, field_tokens: int = 2048
) -> tuple[np.ndarray, list[str]]:
    """Greedy `generate` per pair with output_scores; rank_score = N x product of the probabilities of the
    tokens between `<answer>` and `</answer>`; 0.0 when there is no such answer."""
    tok, model = _load(path)
    answer_open, answer_close = tok.convert_tokens_to_ids("<answer>"), tok.convert_tokens_to_ids("</answer>")
    scores, texts = [], []
    for p in pairs:

        def cut(text: str) -> str:  # the card's `truncate`: tokens, cut, back to text
            return tok.convert_tokens_to_string(tok.tokenize(text)[:field_tokens])

        content = ERANK_PROMPT.format(
            instruction=p.instruction or QWEN3_DEFAULT, query=cut(p.query), doc=cut(p.document)
        )
        text = tok.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if forced:
            text += "<think>\n\n</think>\n<answer>"
        ids = torch.tensor([_ids(tok, text)])
        with torch.no_grad():
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6 if forced else ERANK_NEW_TOKENS,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                stop_strings=["</answer>"],
                tokenizer=tok,
            )
        new = gen.sequences[0, ids.shape[1] :].tolist()
        probs = [torch.softmax(s[0].float(), -1)[t].item() for s, t in zip(gen.scores, new, strict=False)]
        texts.append(tok.decode(new))
        start = 0 if forced else (new.index(answer_open) + 1 if answer_open in new else None)
        end = new.index(answer_close) if answer_close in new else None
        digits = tok.decode(new[start:end]) if start is not None and end is not None else ""
        if not re.fullmatch(r"\d+", digits) or int(digits) > 10:
            scores.append(0.0)
            continue
        scores.append(int(digits) * float(np.prod(probs[start:end])))
    return np.asarray(scores), texts


def _compositions(scorer: Scorer, pairs: list[Pair]) -> dict[str, np.ndarray]:
    out = {"one batch": scorer.score(pairs)}
    out["one at a time"] = np.concatenate([scorer.score([p]) for p in pairs])
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    shuffled = np.empty(len(pairs), dtype=np.float32)
    for start in range(0, len(order), 3):
        chunk = order[start : start + 3]
        shuffled[chunk] = scorer.score([pairs[i] for i in chunk])
    out["shuffled batches of 3"] = shuffled
    return out


@pytest.mark.parametrize("family", ["qwen3-reranker", "mxbai-rerank-v2", "bge-reranker-v2-gemma"])
def test_logit_family_matches_reference(family: str, llm_dirs: dict[str, Path]) -> None:
    path = llm_dirs[family]
    extra = {"max_length": BGE_MAX_LENGTH} if family == "bge-reranker-v2-gemma" else {}
    scorer = make_scorer(path, dtype="float32", **extra)  # family from the directory's name
    assert scorer.info.backend == f"causal-lm/{family}"
    assert scorer.accepts_instruction
    plain, instructed = _pairs(), _pairs(instruction=INSTRUCTION)
    reference = reference_logit_scores(family, path, plain)
    assert np.std(reference) > 1e-3, "flat reference scores: the comparison would be vacuous"
    for name, scores in _compositions(scorer, plain).items():
        np.testing.assert_allclose(scores, reference, atol=TOL, rtol=0, err_msg=f"{family}, {name}")
    with_instruction = scorer.score(instructed)
    np.testing.assert_allclose(
        with_instruction, reference_logit_scores(family, path, instructed), atol=TOL, rtol=0
    )
    assert np.max(np.abs(with_instruction - reference)) > 1e-3, "the instruction changed nothing"
    if family == "bge-reranker-v2-gemma":
        assert any(m.truncated for m in scorer.measure(plain)), "max_length 64 should truncate"


def test_erank_matches_reference_generation(llm_dirs: dict[str, Path]) -> None:
    path = llm_dirs["erank"]
    scorer = make_scorer(path, dtype="float32", llm_max_new_tokens=ERANK_NEW_TOKENS)
    assert scorer.info.backend == "causal-lm/erank"
    pairs = _pairs(3)
    reference, texts = reference_erank_scores(path, pairs)
    assert sum(s > 0 for s in reference) >= len(pairs) // 2, f"the tiny model should mostly answer: {texts}"
    assert np.std(reference) > 0, texts
    for name, scores in _compositions(scorer, pairs).items():
        np.testing.assert_allclose(scores, reference, atol=TOL, rtol=0, err_msg=name)
    instructed = _pairs(3, instruction=INSTRUCTION)
    with_instruction = scorer.score(instructed)
    np.testing.assert_allclose(
        with_instruction, reference_erank_scores(path, instructed)[0], atol=TOL, rtol=0
    )
    assert np.max(np.abs(with_instruction - reference)) > 1e-6, "the instruction changed nothing"


def test_erank_cuts_query_and_document_to_field_tokens(llm_dirs: dict[str, Path]) -> None:
    path = llm_dirs["erank"]
    scorer = make_scorer(path, dtype="float32", llm_max_new_tokens=ERANK_NEW_TOKENS, llm_field_tokens=12)
    pairs = _pairs(3)
    assert all(m.truncated for m in scorer.measure(pairs))
    reference, texts = reference_erank_scores(path, pairs, field_tokens=12)
    np.testing.assert_allclose(scorer.score(pairs), reference, atol=TOL, rtol=0, err_msg=str(texts))


def test_erank_forced_answer_matches_its_reference_and_costs_fewer_tokens(llm_dirs: dict[str, Path]) -> None:
    path = llm_dirs["erank"]
    full = make_scorer(path, dtype="float32", llm_max_new_tokens=ERANK_NEW_TOKENS)
    fast = make_scorer(path, dtype="float32", llm_forced_answer=True)
    assert fast.info.backend == "causal-lm/erank+forced-answer"
    pairs = _pairs(3)
    reference, texts = reference_erank_scores(path, pairs, forced=True)
    assert np.std(reference) > 0, f"the comparison would be vacuous: {texts}"
    np.testing.assert_allclose(fast.score(pairs), reference, atol=TOL, rtol=0)
    # The budget counts generated tokens: full mode reserves its whole reasoning budget per pair.
    gap = [f.tokens - q.tokens for f, q in zip(full.measure(pairs), fast.measure(pairs), strict=True)]
    prefix = len(_ids(fast.tokenizer, "<think>\n\n</think>\n<answer>"))  # type: ignore[attr-defined]
    assert gap == [ERANK_NEW_TOKENS - 6 - prefix] * len(pairs)


def test_erank_answer_rules(llm_dirs: dict[str, Path]) -> None:
    """'10' is two digit tokens (10 x p1 x p0); no answer, or one above 10, scores nothing."""
    from transformers import AutoTokenizer

    from sidecar.scoring.causal_lm import answer_score

    tok = AutoTokenizer.from_pretrained(str(llm_dirs["erank"]))

    def run(text: str, probs: dict[str, float]) -> float | None:
        ids = _ids(tok, text)
        pieces = [tok.decode([i]) for i in ids]
        return answer_score(tok, ids, [probs.get(p, 0.5) for p in pieces])

    assert len(_ids(tok, "10")) == 2
    assert run("<think>ok</think><answer>10</answer>", {"1": 0.6, "0": 0.25}) == pytest.approx(
        10 * 0.6 * 0.25
    )
    assert run("<think>ok</think><answer>7</answer>", {"7": 0.4}) == pytest.approx(7 * 0.4)
    assert run("<think>ok</think><answer>0</answer>", {"0": 0.9}) == 0.0
    assert run("<think>ok</think><answer>11</answer>", {}) is None
    assert run("<think>ok</think><answer>seven</answer>", {}) is None
    assert run("<think>still thinking about it", {}) is None
    assert run("<answer>7<answer>70</answer>", {}) is None  # the first complete answer is 70


def test_generated_tokens_count_in_the_batch_budget(llm_dirs: dict[str, Path]) -> None:
    import asyncio

    from sidecar.batcher import Batcher
    from sidecar.metrics import Metrics
    from tests.fakes import RecordingScorer

    scorer = make_scorer(llm_dirs["erank"], dtype="float32", llm_max_new_tokens=ERANK_NEW_TOKENS)
    pairs = _pairs(3)
    tok = scorer.tokenizer  # type: ignore[attr-defined]
    prompts = [
        len(
            tok.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": ERANK_PROMPT.format(
                            instruction=QWEN3_DEFAULT, query=p.query, doc=p.document
                        ),
                    }
                ],
                tokenize=True,
                add_generation_prompt=True,
                return_dict=True,
            )["input_ids"]
        )
        for p in pairs
    ]
    measures = scorer.measure(pairs)
    assert [m.tokens for m in measures] == [n + ERANK_NEW_TOKENS for n in prompts]
    budget = 2 * max(m.tokens for m in measures)
    rec = RecordingScorer(scorer)

    async def main() -> np.ndarray:
        b = Batcher(
            rec, Metrics(), max_batch_tokens=budget, max_batch_pairs=64, max_wait_s=0.0, max_queue_pairs=100
        )
        b.start()
        try:
            scores, _ = await b.submit(
                pairs, [m.tokens for m in measures], asyncio.get_running_loop().time() + 120
            )
            return scores
        finally:
            await b.close()

    scores = asyncio.run(main())
    assert all(len(batch) <= 2 for batch in rec.batches), [len(b) for b in rec.batches]
    np.testing.assert_allclose(scores, reference_erank_scores(llm_dirs["erank"], pairs)[0], atol=TOL, rtol=0)


def test_unknown_causal_lm_needs_a_family(tmp_path: Path, llm_dirs: dict[str, Path]) -> None:
    import shutil

    from sidecar.scoring.loading import ModelLoadError

    anonymous = tmp_path / "some-llm"
    shutil.copytree(llm_dirs["qwen3-reranker"], anonymous)
    with pytest.raises(ModelLoadError, match="--llm-family"):
        make_scorer(anonymous, dtype="float32")
    assert make_scorer(anonymous, dtype="float32", llm_family="mxbai-rerank-v2").info.backend == (
        "causal-lm/mxbai-rerank-v2"
    )


def test_a_huge_document_is_clipped_before_tokenizing_and_scores_the_same(llm_dirs: dict[str, Path]) -> None:
    """Memory per request is bounded by what the family reads, not by the request (issue 12's rule applied
    to causal LMs): measuring keeps a prefix a little past the family's limit, and the score is that of
    the whole document (the family truncates at its limit either way)."""
    from sidecar.scoring.base import Pair

    scorer = make_scorer(llm_dirs["qwen3-reranker"], dtype="float32", max_length=64)
    huge = " ".join(["protein folding and the hydrophobic effect"] * 20_000)  # ~880 k characters
    pair = Pair("what drives protein folding", huge)
    (m,) = scorer.measure([pair])
    assert m.clipped is not None and len(m.clipped.document) < len(huge) // 100 and m.truncated
    assert huge.startswith(m.clipped.document)
    assert scorer.score([m.clipped])[0] == pytest.approx(scorer.score([pair])[0], abs=1e-6)
