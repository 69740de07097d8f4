"""Prompt templates of the causal-LM rerankers, one per family, each naming the reference it follows.

A family turns (query, document, instruction) into the exact token ids its authors' code feeds the model
(same text, same truncation rule) and says how a score is read: from the last position's logits of
chosen tokens (Qwen3-Reranker, mxbai-rerank-v2, bge-reranker-v2-gemma), or by generating an answer
(ERank). Facts about each reference are cited beside the family; the code is ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

FAMILIES = ("erank", "qwen3-reranker", "mxbai-rerank-v2", "bge-reranker-v2-gemma")

# Score read from the last position's logits: `true` alone, `true - false`, or sigmoid(true - false).
LogitRule = Literal["logit", "difference", "sigmoid-difference"]


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    truncated: bool


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


class Family:
    """One reranker family: its prompt, its truncation, its default instruction and its scoring rule."""

    name = ""
    source = ""
    default_instruction: str | None = None
    # What the scorer does with the model's output.
    mode: Literal["logits", "generate"] = "logits"
    rule: LogitRule = "logit"
    true_token = ""
    false_token: str | None = None
    # The reference's own default pair length, used when --max-length is unset.
    default_max_length = 8192

    def __init__(self, tokenizer: Any, max_length: int | None) -> None:
        self.tok = tokenizer
        self.max_length = max_length or self.default_max_length

    def token_id(self, text: str) -> int:
        """The first token of `text`, as each reference takes its answer tokens."""
        ids = _ids(self.tok, text)
        if not ids:
            raise ValueError(f"the tokenizer maps {text!r} to no token")
        return ids[0]

    def encode(self, query: str, document: str, instruction: str | None) -> Encoded:
        raise NotImplementedError


class Qwen3Reranker(Family):
    """Qwen/Qwen3-Reranker-{0.6B,4B,8B}: fixed system prompt, `<Instruct>/<Query>/<Document>` user turn, an
    empty think block; p(yes) = softmax over the logits of "yes" and "no" at the last position, which is
    sigmoid(logit yes - logit no). The body is truncated from its end to max_length minus the template
    (default 8192), as the model card's `process_inputs` does."""

    name = "qwen3-reranker"
    source = "https://huggingface.co/Qwen/Qwen3-Reranker-0.6B (model card, transformers usage)"
    default_instruction = "Given a web search query, retrieve relevant passages that answer the query"
    rule: LogitRule = "sigmoid-difference"
    true_token = "yes"
    false_token = "no"
    prefix = (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
        'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    )
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

    def encode(self, query: str, document: str, instruction: str | None) -> Encoded:
        prefix, suffix = _ids(self.tok, self.prefix), _ids(self.tok, self.suffix)
        instruction = instruction or self.default_instruction
        body = _ids(self.tok, f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}")
        room = self.max_length - len(prefix) - len(suffix)
        return Encoded(prefix + body[:room] + suffix, len(body) > room)


class MxbaiRerankV2(Family):
    """mixedbread-ai/mxbai-rerank-{base,large}-v2 (Qwen2): `query: ...` (after `instruction: ...` when one is
    given; no default) and `document: ...` inside a Qwen chat turn, then the task prompt; score =
    logit("1") - logit("0") at the last position. Query capped at 3/4 of max_length, the document fills the
    rest (mxbai_rerank/mxbai_rerank_v2.py, `prepare_inputs`)."""

    name = "mxbai-rerank-v2"
    source = "https://github.com/mixedbread-ai/mxbai-rerank (mxbai_rerank/mxbai_rerank_v2.py)"
    rule: LogitRule = "difference"
    true_token = "1"
    false_token = "0"
    sep = "\n"
    task = (
        "You are a search relevance expert who evaluates how well documents match search queries. For each "
        "query-document pair, carefully analyze the semantic relationship between them, then provide your "
        "binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
    )
    prefix = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
    )
    suffix = "<|im_end|>\n<|im_start|>assistant\n"

    def encode(self, query: str, document: str, instruction: str | None) -> Encoded:
        prefix, suffix = _ids(self.tok, self.prefix), _ids(self.tok, self.suffix)
        sep, task = _ids(self.tok, self.sep), _ids(self.tok, self.task)
        fixed = len(prefix) + len(task) + len(suffix) + len(sep)
        model_max = _model_max_length(self.tok, self.max_length + fixed)
        max_length = min(self.max_length, model_max - fixed)
        q_text = f"query: {query}"
        if instruction:
            q_text = f"instruction: {instruction}{self.sep}{q_text}"
        q_full = _ids(self.tok, q_text)
        q = q_full[: max_length * 3 // 4]
        d_full = _ids(self.tok, f"document: {document}")
        d = d_full[: max(0, min(model_max - len(q) - fixed, max_length))]
        second = (sep + d)[: max(0, max_length - len(q))]
        truncated = len(q) < len(q_full) or len(second) < len(sep) + len(d_full)
        return Encoded(prefix + q + second + sep + task + suffix, truncated)


class BgeRerankerV2Gemma(Family):
    """BAAI/bge-reranker-v2-gemma (FlagEmbedding `BaseLLMReranker`): [bos] `A: query`, `\\n`, `B: passage`,
    `\\n`, then the task prompt; score = logit("Yes") at the last position. The instruction replaces the task
    prompt (FlagEmbedding's `prompt`). Query capped at 3/4 of max_length (default 512), the passage at
    max_length and then cut so query + passage fit max_length plus the prompt."""

    name = "bge-reranker-v2-gemma"
    source = "https://github.com/FlagOpen/FlagEmbedding (inference/reranker/decoder_only/base.py)"
    default_instruction = (
        "Given a query A and a passage B, determine whether the passage contains an answer to the query by "
        "providing a prediction of either 'Yes' or 'No'."
    )
    rule: LogitRule = "logit"
    true_token = "Yes"
    default_max_length = 512

    def encode(self, query: str, document: str, instruction: str | None) -> Encoded:
        sep = _ids(self.tok, "\n")
        prompt = _ids(self.tok, instruction or self.default_instruction)
        q_full, d_full = _ids(self.tok, f"A: {query}"), _ids(self.tok, f"B: {document}")
        q, d = q_full[: self.max_length * 3 // 4], d_full[: self.max_length]
        bos = self.tok.bos_token_id
        first = ([bos] if bos is not None and bos != self.tok.pad_token_id else []) + q
        limit = self.max_length + len(sep) + len(prompt)
        second = (sep + d)[: max(0, limit - len(first))]
        truncated = len(q) < len(q_full) or len(second) < len(sep) + len(d_full)
        return Encoded(first + second + sep + prompt, truncated)


class ERank(Family):
    """Alibaba-NLP/ERank-{4B,14B,32B} (Qwen3): one user message built from the model card's prompt
    (examples/utils.py) through the model's chat template with the generation prompt; greedy decoding of
    `<think>...</think><answer>N</answer>`. Query and document are each cut to `field_tokens` tokens
    (2048 in the card's examples); the instruction never is. The score (N x P(N)) is read by the scorer."""

    name = "erank"
    source = "https://huggingface.co/Alibaba-NLP/ERank-4B (examples/utils.py, examples/ERank_Transformer.py)"
    # The card passes an instruction on every call and ships no default; this one is ours (Qwen3's).
    default_instruction = "Given a web search query, retrieve relevant passages that answer the query"
    mode: Literal["logits", "generate"] = "generate"
    default_max_length = 40960
    template = (
        "Given a query and a document, please give a relevance score of 0~10.\n"
        "The goal or relevance definition is: {instruction}\n\n"
        "Here is the query:\n{query}\n\n"
        "Here is the document:\n{doc}\n\n"
        "After thinking, directly choose a relevance score from [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10].\n"
        "- 0 represents completely not related\n"
        "- 10 means perfectly related.\n\n"
        "Desired output format:\n"
        "<think>put your thinking here</think><answer>Only allows an integer here</answer>\n\n"
        "Your output:"
    )
    # Fast mode: the generation prompt is followed by an empty think block and the opening answer tag.
    forced_prefix = "<think>\n\n</think>\n<answer>"

    def __init__(self, tokenizer: Any, max_length: int | None, field_tokens: int = 2048) -> None:
        super().__init__(tokenizer, max_length)
        self.field_tokens = field_tokens

    def _cut(self, text: str) -> tuple[str, bool]:
        tokens = self.tok.tokenize(text)
        if len(tokens) <= self.field_tokens:
            return text, False
        return self.tok.convert_tokens_to_string(tokens[: self.field_tokens]), True

    def prompt_text(self, query: str, document: str, instruction: str | None) -> tuple[str, bool]:
        q, q_cut = self._cut(query)
        d, d_cut = self._cut(document)
        content = self.template.format(instruction=instruction or self.default_instruction, query=q, doc=d)
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return str(text), q_cut or d_cut

    def encode(self, query: str, document: str, instruction: str | None) -> Encoded:
        text, truncated = self.prompt_text(query, document, instruction)
        ids = _ids(self.tok, text)
        return Encoded(ids[-self.max_length :], truncated or len(ids) > self.max_length)


def _model_max_length(tok: Any, fallback: int) -> int:
    limit = getattr(tok, "model_max_length", None)
    return int(limit) if limit and limit < 1_000_000 else fallback


_REGISTRY: dict[str, type[Family]] = {
    cls.name: cls for cls in (ERank, Qwen3Reranker, MxbaiRerankV2, BgeRerankerV2Gemma)
}


def family_class(name: str) -> type[Family]:
    return _REGISTRY[name]


def guess_family(model_id: str) -> str | None:
    """The family a model's name announces ("Alibaba-NLP/ERank-4B" -> "erank"), else None. Only the last
    path component counts, and "erank" must start a word ("Qwen3-Reranker" is not ERank)."""
    name = model_id.rstrip("/").rsplit("/", 1)[-1].lower().replace("_", "-")
    for pattern, family in (
        (r"(^|[^a-z])erank", "erank"),
        (r"qwen3-reranker", "qwen3-reranker"),
        (r"mxbai-rerank", "mxbai-rerank-v2"),
        (r"bge-reranker-v2-gemma", "bge-reranker-v2-gemma"),
    ):
        if re.search(pattern, name):
            return family
    return None
