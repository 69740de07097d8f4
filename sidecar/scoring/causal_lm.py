"""Causal-LM backend: pointwise rerankers built from decoder language models (docs/llm.md).

The prompt of each family comes from `prompts.py`. Logit families read chosen tokens' logits at the last
position of a left-padded batch in one forward pass. ERank reasons then answers: greedy generation of the
whole batch at once, stopped per sequence at `</answer>`, with the probability of every chosen token
recorded in the same pass; rank_score = N x P(N), P(N) the product of the probabilities of N's digit
tokens ("10" is two tokens in Qwen tokenizers: 10 x p("1") x p("0" | "1")). An answer that cannot be
parsed (no `<answer>N</answer>` with N in 0..10 within the token budget) scores 0.0, like the model's own 0.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from sidecar.scoring._st import quiet_transformers
from sidecar.scoring.base import Measure, Pair, Scorer, clip_text
from sidecar.scoring.device import Placement
from sidecar.scoring.prompts import Encoded, ERank, Family, family_class
from sidecar.settings import Settings
from sidecar.types import ModelInfo

log = logging.getLogger(__name__)

STOP = "</answer>"
# The first complete answer: an integer alone between the tags.
_ANSWER = re.compile(r"<answer>\s*(\d+)\s*</answer>")
# Forced mode: enough new tokens for "10</answer>" in Qwen tokenizers ("1", "0", "</", "answer", ">").
FORCED_NEW_TOKENS = 6
# Encodings made by `measure` (tokenize threads) and consumed by `score` (model thread): tokenize once.
_ENCODING_CACHE = 4096


def parse_answer(text: str) -> tuple[int, int, int] | None:
    """(N, start, end) of the first `<answer>N</answer>` in `text`, N in 0..10; None when there is none."""
    m = _ANSWER.search(text)
    if m is None or int(m.group(1)) > 10:
        return None
    return int(m.group(1)), m.start(1), m.end(1)


def answer_score(
    tokenizer: Any, ids: Sequence[int], probs: Sequence[float], prefix: str = ""
) -> float | None:
    """N x P(N) from generated token ids and each one's probability; `prefix` is text forced before them.

    P(N) is the product of the probabilities of the tokens that spell N. None when no answer parses.
    """
    text = prefix + tokenizer.decode(list(ids), skip_special_tokens=False)
    found = parse_answer(text)
    if found is None:
        return None
    value, start, end = found
    p = 1.0
    # Walk back from the end (the answer is the last thing generated), with each token's character span.
    hi = len(text)
    for j in range(len(ids) - 1, -1, -1):
        lo = len(prefix) + len(tokenizer.decode(list(ids[:j]), skip_special_tokens=False))
        if lo < end and hi > start:
            p *= float(probs[j])
        if lo <= start:
            break
        hi = lo
    return value * p


def _key(p: Pair) -> tuple[str, str, str | None]:
    return (p.query, p.document, p.instruction)


class _ChosenProbability:
    """A logits processor that records, per step, the probability of the greedy (arg-max) token under the
    model's own softmax; it changes nothing, so decoding stays plain greedy."""

    def __init__(self) -> None:
        self.steps: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self.steps.append(torch.softmax(scores.float(), dim=-1).max(dim=-1).values.cpu())
        return scores


class CausalLMScorer(Scorer):
    backend = "causal-lm"

    def __init__(self, source: Any, placement: Placement, settings: Settings, family: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_transformers()
        common = {
            "revision": None if source.local else source.revision,
            "local_files_only": source.local,
            "trust_remote_code": settings.trust_remote_code,
        }
        tok = AutoTokenizer.from_pretrained(source.path_or_id, **common)
        tok.padding_side = "left"  # the last position is every row's last real token
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        cls = family_class(family)
        self.family: Family = (
            ERank(tok, settings.max_length, settings.llm_field_tokens)
            if cls is ERank
            else cls(tok, settings.max_length)
        )
        self.forced = settings.llm_forced_answer and self.family.mode == "generate"
        self.max_new_tokens = (
            (FORCED_NEW_TOKENS if self.forced else settings.llm_max_new_tokens) if self._generates else 0
        )
        self._forced_ids = (
            list(tok(ERank.forced_prefix, add_special_tokens=False)["input_ids"]) if self.forced else []
        )
        self._measure_family = copy.copy(self.family)
        self._measure_family.tok = copy.deepcopy(tok)
        self._measure_lock = threading.Lock()
        self._encodings: OrderedDict[tuple[str, str, str | None], Encoded] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.parse_failures = 0
        self._device = torch.device(placement.device)
        self._vllm = _vllm_engine(source, placement, settings) if self._generates else None
        self.model: Any = None
        if self._vllm is None:
            self.model = AutoModelForCausalLM.from_pretrained(
                source.path_or_id,
                dtype=placement.torch_dtype(),
                attn_implementation=placement.attention,
                **common,
            )
            self.model.to(self._device).eval()
        if self.family.mode == "logits":
            self._true = self.family.token_id(self.family.true_token)
            self._false = self.family.token_id(self.family.false_token) if self.family.false_token else None
        self.info = ModelInfo(
            model_id=source.model_id,
            revision=source.revision,
            backend=f"causal-lm/{self.family.name}" + ("+forced-answer" if self.forced else ""),
            device="vllm:" + str(self._device) if self._vllm is not None else str(self._device),
            dtype=placement.dtype,
            attention=placement.attention,
            max_length=self.family.max_length,
            accepts_instruction=True,
        )

    @property
    def _generates(self) -> bool:
        return self.family.mode == "generate"

    # ---- pre: prompt tokens (once per pair) ---------------------------------------------------
    def _count(self, text: str) -> int:
        with self._measure_lock:
            return len(self._measure_family.tok(text, add_special_tokens=False)["input_ids"])

    def measure(self, pairs: Sequence[Pair]) -> list[Measure]:
        # No family reads more of a document than this, so only a prefix a little past it is held,
        # tokenized and scored (memory per request bounded by the model, not by the request).
        limit = self.family.field_tokens if isinstance(self.family, ERank) else self.family.max_length
        clipped: list[Pair | None] = []
        for p in pairs:
            doc = clip_text(p.document, limit, self._count)
            clipped.append(p._replace(document=doc) if doc is not p.document else None)
        pairs = [c or p for c, p in zip(clipped, pairs, strict=True)]
        out = []
        with self._measure_lock:
            encs = [self._measure_family.encode(p.query, p.document, p.instruction) for p in pairs]
        with self._cache_lock:
            for p, enc in zip(pairs, encs, strict=True):
                self._encodings[_key(p)] = enc
                self._encodings.move_to_end(_key(p))
            while len(self._encodings) > _ENCODING_CACHE:
                self._encodings.popitem(last=False)
        for enc, c in zip(encs, clipped, strict=True):
            # Generated tokens cost like prompt tokens (KV cache, compute): the batcher's budget counts them.
            out.append(Measure(len(enc.ids) + len(self._forced_ids) + self.max_new_tokens, enc.truncated, c))
        return out

    def _encode(self, pairs: Sequence[Pair]) -> list[list[int]]:
        ids = []
        for p in pairs:
            with self._cache_lock:
                enc = self._encodings.pop(_key(p), None)
            if enc is None:
                enc = self.family.encode(p.query, p.document, p.instruction)
            ids.append(list(enc.ids) + self._forced_ids)
        return ids

    def _batch(self, ids: list[list[int]]) -> dict[str, Any]:
        import torch

        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)
        return {"input_ids": input_ids.to(self._device), "attention_mask": mask.to(self._device)}

    # ---- core + post ----------------------------------------------------------------------------
    def score(
        self, pairs: Sequence[Pair], encodings: Sequence[object] | None = None, *, first_pass: bool = False
    ) -> np.ndarray:
        if first_pass:
            raise ValueError("first_pass needs a cascade, which only cross-encoders have")
        # Encodings come through the cache `measure` fills (prompt tokens depend on the family).
        del encodings
        ids = self._encode(pairs)
        if self._generates:
            return self._generate_scores(ids)
        return self._logit_scores(ids)

    def _logit_scores(self, ids: list[list[int]]) -> np.ndarray:
        import torch

        assert self.model is not None
        batch = self._batch(ids)
        # Positions count real tokens only, so a left-padded row is computed exactly as it would be alone.
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(**batch, position_ids=positions, logits_to_keep=1).logits[:, -1, :].float()
        score = logits[:, self._true]
        if self._false is not None:
            score = score - logits[:, self._false]
        if self.family.rule == "sigmoid-difference":
            score = torch.sigmoid(score)
        return score.cpu().numpy().astype(np.float32)

    def _generate_scores(self, ids: list[list[int]]) -> np.ndarray:
        rows = self._vllm_generate(ids) if self._vllm is not None else self._hf_generate(ids)
        prefix = ERank.forced_prefix if self.forced else ""
        scores = np.zeros(len(ids), dtype=np.float32)
        for i, (gen, probs) in enumerate(rows):
            value = answer_score(self.tokenizer, gen, probs, prefix)
            if value is None:
                self.parse_failures += 1
                log.warning(
                    "no <answer>0..10</answer> within %d generated tokens; scored 0.0 (%d so far). "
                    "Raise --llm-max-new-tokens if this repeats",
                    self.max_new_tokens,
                    self.parse_failures,
                )
                continue
            scores[i] = value
        return scores

    def _hf_generate(self, ids: list[list[int]]) -> list[tuple[list[int], list[float]]]:
        import torch
        from transformers import LogitsProcessorList

        assert self.model is not None
        batch = self._batch(ids)
        recorder = _ChosenProbability()
        with torch.inference_mode():
            out = self.model.generate(
                **batch,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                logits_processor=LogitsProcessorList([recorder]),
                stop_strings=[STOP],
                tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.model.generation_config.eos_token_id,
                # The model's generation_config may carry sampling knobs (temperature, top_p): unused here.
                temperature=None,
                top_p=None,
                top_k=None,
            )
        generated = out[:, batch["input_ids"].shape[1] :].tolist()
        probs = torch.stack(recorder.steps, dim=1).tolist() if recorder.steps else [[]] * len(ids)
        eos = self.model.generation_config.eos_token_id
        # A row that finished (end token or stop string) is padded after its last token.
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids.add(self.tokenizer.pad_token_id)
        rows = []
        for gen, p in zip(generated, probs, strict=True):
            n = len(gen)
            for j, t in enumerate(gen):
                if t in eos_ids:
                    n = j + (t != self.tokenizer.pad_token_id)
                    break
            rows.append((gen[:n], p[:n]))
        return rows

    def _vllm_generate(self, ids: list[list[int]]) -> list[tuple[list[int], list[float]]]:
        """GPU only, untested in this project's CI (no vLLM there): same prompts, greedy, same stop."""
        import math

        llm, params, prompt_cls = self._vllm  # type: ignore[misc]
        outputs = llm.generate([prompt_cls(prompt_token_ids=x) for x in ids], params, use_tqdm=False)
        rows = []
        for o in outputs:
            c = o.outputs[0]
            rows.append(
                (
                    list(c.token_ids),
                    [math.exp(lp[t].logprob) for t, lp in zip(c.token_ids, c.logprobs, strict=True)],
                )
            )
        return rows


def _vllm_engine(source: Any, placement: Placement, settings: Settings) -> Any:
    """(LLM, SamplingParams, TokensPrompt) when --llm-engine asks for vLLM and it can run, else None."""
    import importlib.util

    wanted = settings.llm_engine
    usable = placement.device.startswith("cuda") and importlib.util.find_spec("vllm") is not None
    if wanted == "transformers" or (wanted == "auto" and not usable):
        return None
    if not usable:
        raise ValueError("--llm-engine vllm needs CUDA and the vllm package; use --llm-engine transformers")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=source.path_or_id,
        revision=None if source.local else source.revision,
        dtype=placement.dtype,
        enable_prefix_caching=True,  # every prompt of a request shares the instruction and query
        trust_remote_code=settings.trust_remote_code,
    )
    max_tokens = FORCED_NEW_TOKENS if settings.llm_forced_answer else settings.llm_max_new_tokens
    params = SamplingParams(
        temperature=0,
        max_tokens=max_tokens,
        logprobs=1,  # the chosen token's log-probability is always among those returned
        stop=[STOP],
        include_stop_str_in_output=True,
    )
    return llm, params, TokensPrompt
