"""Fixtures for the runtime tests: a tiny bi-encoder built from a config, one shared export cache."""

from __future__ import annotations

from pathlib import Path

import pytest


def build_tiny_bi_encoder(out: Path, hidden: int = 32) -> Path:
    """A sentence-transformers embedding model: tiny random BERT, mean pooling, normalisation."""
    import tempfile

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    from sidecar.model_factory import _tokenizer

    tok = _tokenizer()
    torch.manual_seed(1)
    cfg = BertConfig(  # type: ignore[call-arg]
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        enc = Path(tmp) / "encoder"
        BertModel(cfg).save_pretrained(enc)
        tok.model_max_length = 128
        tok.save_pretrained(enc)
        modules = [Transformer(str(enc)), Pooling(hidden, pooling_mode="mean"), Normalize()]
        SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


@pytest.fixture(scope="session")
def bi_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bi_encoder(tmp_path_factory.mktemp("models") / "tiny-bi-encoder")


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export cache for the session: each model is exported once per runtime and quantisation."""
    return tmp_path_factory.mktemp("exports")
