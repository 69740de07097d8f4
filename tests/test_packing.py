"""Padding-free batches (sidecar/scoring/packing.py): packing arithmetic and the way back, checked against
plain list arithmetic; the packed forward pass against the padded one and against sentence-transformers
`CrossEncoder.predict` (float32, within 1e-4), with the CPU reference for the varlen kernel."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sidecar.batcher import Batcher
from sidecar.metrics import Metrics
from sidecar.scoring import packing
from sidecar.scoring.base import Pair, Scorer
from tests.fakes import RecordingScorer
from tests.texts import documents, queries

PAD = 0


def _padded(seqs: list[list[int]], left: bool = False) -> dict[str, torch.Tensor]:
    """The padded batch a tokenizer would give, built by hand: ids, mask, token types 0 then 1."""
    width = max(len(s) for s in seqs)
    ids, mask, types = [], [], []
    for s in seqs:
        pad = [PAD] * (width - len(s))
        real_types = [0] * ((len(s) + 1) // 2) + [1] * (len(s) // 2)
        if left:
            (
                ids.append(pad + s),
                mask.append([0] * len(pad) + [1] * len(s)),
                types.append([0] * len(pad) + real_types),
            )
        else:
            (
                ids.append(s + pad),
                mask.append([1] * len(s) + [0] * len(pad)),
                types.append(real_types + [0] * len(pad)),
            )
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "token_type_ids": torch.tensor(types),
    }


def _cases() -> list[list[int]]:
    rng = random.Random(13)
    named = [
        [1],  # one sequence
        [5],
        [7, 7, 7, 7],  # equal lengths
        [1, 1, 1],  # length 1 everywhere
        [1, 500, 2, 3],  # very unequal
        [512, 1],
    ]
    drawn = [[rng.randint(1, 60) for _ in range(rng.randint(1, 12))] for _ in range(40)]
    return named + drawn


@pytest.mark.parametrize("lengths", _cases(), ids=lambda c: "-".join(map(str, c))[:40])
@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_pack_and_unpack_round_trip(lengths: list[int], left: bool) -> None:
    rng = random.Random(len(lengths) * 1000 + sum(lengths))
    seqs = [[rng.randint(1, 30000) for _ in range(n)] for n in lengths]
    features = _padded(seqs, left=left)
    packed = packing.pack(features)

    # cu_seqlens: int32, from 0, one step per sequence of exactly its length, ending at the total.
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert packed.n == len(lengths) and packed.total == sum(lengths)
    assert packed.max_seqlen == max(lengths)
    # One row, no padding: every sequence's tokens in order, positions restarting at 0.
    assert packed.input_ids.tolist() == [t for s in seqs for t in s]
    assert packed.position_ids.tolist() == [p for n in lengths for p in range(n)]
    types = [
        t
        for row, m in zip(
            features["token_type_ids"].tolist(), features["attention_mask"].tolist(), strict=True
        )
        for t, k in zip(row, m, strict=True)
        if k
    ]
    assert packed.token_type_ids is not None and packed.token_type_ids.tolist() == types

    # The way back.
    assert torch.equal(packing.to_padded(packed.input_ids, packed, fill=PAD), features["input_ids"])
    assert packing.first_tokens(packed.input_ids, packed).tolist() == [s[0] for s in seqs]
    values = torch.randn(packed.total, 3)
    padded_values = packing.to_padded(values, packed)
    mask = features["attention_mask"].bool()
    assert torch.equal(padded_values[mask], values) and not padded_values[~mask].any()
    means = torch.stack(
        [
            values[a:b].mean(0)
            for a, b in zip(packed.cu_seqlens[:-1].tolist(), packed.cu_seqlens[1:].tolist(), strict=True)
        ]
    )
    torch.testing.assert_close(packing.segment_mean(values, packed), means)

    # Encodings packed directly give the same batch (right-padded layout).
    direct = packing.pack_sequences(seqs, None)
    assert torch.equal(direct.input_ids, packed.input_ids)
    assert torch.equal(direct.position_ids, packed.position_ids)
    assert torch.equal(direct.cu_seqlens, packed.cu_seqlens)
    if not left:
        assert torch.equal(direct.indices, packed.indices)


def test_a_row_flattened_by_transformers_is_taken_as_it_is() -> None:
    """sentence-transformers flattens feature-extraction batches itself under flash-attn, with
    transformers' DataCollatorWithFlattening: the same batch as packing the padded one."""
    from transformers import DataCollatorWithFlattening

    seqs = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)(
        [{"input_ids": s} for s in seqs]
    )
    got, want = packing.pack(flat), packing.pack(_padded(seqs))
    for field in ("input_ids", "position_ids", "cu_seqlens", "indices"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert got.max_seqlen == want.max_seqlen == 5 and got.padded_length == 5


def test_position_offset_and_bad_batches() -> None:
    packed = packing.pack(_padded([[4, 5, 6], [7]]), position_offset=2)  # RoBERTa: after padding_idx 1
    assert packed.position_ids.tolist() == [2, 3, 4, 2]
    with pytest.raises(ValueError, match="at least one token"):
        packing.pack(
            {"input_ids": torch.tensor([[1, 2], [0, 0]]), "attention_mask": torch.tensor([[1, 1], [0, 0]])}
        )
    with pytest.raises(ValueError, match="at least one token"):
        packing.pack_sequences([[1], []])
    with pytest.raises(ValueError, match="attention_mask"):
        packing.pack({"input_ids": torch.tensor([[4, 5, 6, 7]])})
    with pytest.raises(ValueError, match=r"\[n, L\]"):
        packing.pack({"input_ids": torch.tensor([1, 2]), "attention_mask": torch.tensor([1, 1])})


@pytest.mark.parametrize("window", [None, 3])
def test_reference_kernel_equals_one_block_diagonal_attention(window: int | None) -> None:
    """The per-pair loop standing in for flash-attn varlen equals a single SDPA call over the whole row
    with a block-diagonal mask (and the flash window: keys within `window - 1` either side)."""
    torch.manual_seed(0)
    lengths = [1, 7, 2, 12]
    total, heads, dim = sum(lengths), 2, 8
    q, k, v = (torch.randn(1, heads, total, dim) for _ in range(3))
    cu = torch.tensor([0, 1, 8, 10, 22], dtype=torch.int32)
    got, _ = packing.reference_varlen_attention(
        torch.nn.Module(), q, k, v, None, scaling=0.3, sliding_window=window, cu_seq_lens_q=cu
    )
    pair = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(total)
    allowed = pair[:, None] == pair[None, :]
    if window is not None:
        allowed &= (pos[:, None] - pos[None, :]).abs() <= window - 1
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3)
    torch.testing.assert_close(got, want.transpose(1, 2))


# ---- the packed forward pass against the padded one -------------------------------------------
def _pairs() -> list[tuple[str, str]]:
    docs = documents(4)
    # Very unequal lengths: a one-word document, long ones (past the sliding window), the query alone.
    return [(q, d) for q in queries(2) for d in docs[:3]] + [
        (queries(1)[0], "x"),
        (queries(1)[0], " ".join(docs)),
        ("a", ""),
    ]


def _save_classifier(model: torch.nn.Module, tok, out: Path) -> Path:  # type: ignore[no-untyped-def]
    """A Hugging Face sequence classifier with the tokenizer it was built for, loadable as a CrossEncoder."""
    model.save_pretrained(out)  # type: ignore[operator]
    tok.model_max_length = 512
    tok.save_pretrained(out)
    return out


def _build_xlmr_classifier(out: Path) -> Path:
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    from sidecar.model_factory import _tokenizer

    tok = _tokenizer()
    torch.manual_seed(1)
    cfg = XLMRobertaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=514,
        type_vocab_size=2,
        pad_token_id=tok.pad_token_id,
        num_labels=1,
        initializer_range=0.2,
    )
    return _save_classifier(XLMRobertaForSequenceClassification(cfg), tok, out)


def _build_modernbert_classifier(out: Path) -> Path:
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    from sidecar.model_factory import _tokenizer

    tok = _tokenizer()
    torch.manual_seed(2)
    cfg = ModernBertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        local_attention=16,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        classifier_pooling="mean",
        num_labels=1,
        initializer_range=0.2,
    )
    return _save_classifier(ModernBertForSequenceClassification(cfg), tok, out)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from sidecar.model_factory import build_bert_cross_encoder, build_modernbert_modular_cross_encoder

    root = tmp_path_factory.mktemp("packing")
    return {
        "bert": build_bert_cross_encoder(root / "bert", layers=2),
        # Three layers: one global, two sliding with a 16-token window that the long pairs exceed.
        "modernbert-modular": build_modernbert_modular_cross_encoder(
            root / "modernbert", layers=3, local_attention=16, seed=3
        ),
        "modernbert-classifier-mean": _build_modernbert_classifier(root / "modernbert-cls"),
        "xlm-roberta": _build_xlmr_classifier(root / "xlmr"),
    }


def _load(path: Path, attention: str):  # type: ignore[no-untyped-def]
    from sentence_transformers import CrossEncoder

    return CrossEncoder(
        str(path), device="cpu", model_kwargs={"dtype": torch.float32, "attn_implementation": attention}
    )


@pytest.mark.parametrize("kind", ["bert", "modernbert-modular", "modernbert-classifier-mean", "xlm-roberta"])
def test_packed_forward_equals_padded_and_predict(model_dirs: dict[str, Path], kind: str) -> None:
    reference = _load(model_dirs[kind], "sdpa")
    packed_model = _load(model_dirs[kind], packing.register_reference_attention())
    assert packing.supports_packing(packed_model)
    pairs = _pairs()
    features = packed_model.preprocess(pairs)
    lengths = features["attention_mask"].sum(1)
    assert lengths.max() > 16 >= lengths.min()  # the sliding window binds for some pairs only

    with torch.inference_mode():
        padded = reference(reference.preprocess(pairs))["scores"].float().reshape(-1)
        packed = packing.packed_forward(packed_model, features)
        # Control: the same packed row through a kernel that ignores cu_seqlens attends across pairs.
        leaky = packing.packed_forward(reference, features)
    assert packed.dtype == torch.float32 and packed.shape == (len(pairs),)
    np.testing.assert_allclose(packed.numpy(), padded.numpy(), atol=1e-4, rtol=0)
    assert np.abs(leaky.numpy() - padded.numpy()).max() > 1e-2
    assert np.ptp(padded.numpy()) > 1e-2  # scores spread: agreement above is not agreement on a constant

    predicted = reference.predict(pairs, batch_size=4)  # sentence-transformers' own path, its activation
    np.testing.assert_allclose(reference.activation_fn(packed).numpy(), predicted, atol=1e-4, rtol=0)

    if kind.startswith("modernbert"):
        # The row sentence-transformers would hand over after flattening it itself (flash-attn loads).
        from transformers import DataCollatorWithFlattening

        ids = [
            row[m.bool()].tolist()
            for row, m in zip(features["input_ids"], features["attention_mask"], strict=True)
        ]
        flat = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)(
            [{"input_ids": x} for x in ids]
        )
        with torch.inference_mode():
            from_flat = packing.packed_forward(packed_model, flat)
        np.testing.assert_allclose(from_flat.numpy(), padded.numpy(), atol=1e-4, rtol=0)


def test_supports_packing_says_why_not(model_dirs: dict[str, Path]) -> None:
    sdpa = _load(model_dirs["bert"], "sdpa")
    assert not packing.supports_packing(sdpa)
    assert "flash_attention_2" in (packing.why_not_packed(sdpa) or "")


# ---- the batch budget in real tokens ----------------------------------------------------------
def test_batch_cost_counts_padding_only_for_padded_scorers() -> None:
    from sidecar.batcher import batch_cost

    assert batch_cost([100, 10, 10], padding_free=False) == 300
    assert batch_cost([100, 10, 10], padding_free=True) == 120
    assert batch_cost([], padding_free=True) == 0


def test_packed_scorer_batches_fill_the_budget_with_real_tokens(bert_scorer: Scorer) -> None:
    """The same request under the same budget: a padding-free scorer's batches hold more pairs, each
    within the budget in real tokens (though over it if padded), and the scores do not change."""
    budget = 160
    # Length-sorted batches of one request pad little; a long pair among short ones pads a lot.
    query = queries(1)[0]
    pairs = [Pair(query, documents(24)[1] * 4)] + [Pair(query, f"short passage {i}") for i in range(20)]
    tokens = [m.tokens for m in bert_scorer.measure(pairs)]
    assert budget // 2 > max(tokens) > 3 * min(tokens)

    async def run(padding_free: bool) -> tuple[np.ndarray, list[list[Pair]]]:
        rec = RecordingScorer(bert_scorer)
        rec.padding_free = padding_free  # type: ignore[attr-defined]
        b = Batcher(
            rec, Metrics(), max_batch_tokens=budget, max_batch_pairs=128, max_wait_s=0.0, max_queue_pairs=1000
        )
        b.start()
        scores, _ = await b.submit(pairs, tokens, asyncio.get_running_loop().time() + 120)
        await b.close()
        return scores, rec.batches

    padded_scores, padded_batches = asyncio.run(run(False))
    packed_scores, packed_batches = asyncio.run(run(True))
    length = dict(zip(pairs, tokens, strict=True))
    for batch in packed_batches:
        assert sum(length[p] for p in batch) <= budget
    for batch in padded_batches:
        assert len(batch) * max(length[p] for p in batch) <= budget
    assert any(len(b) * max(length[p] for p in b) > budget for b in packed_batches)
    assert len(packed_batches[0]) > len(padded_batches[0])  # the long pair's batch, topped up
    np.testing.assert_allclose(packed_scores, padded_scores, atol=1e-5)


def test_gpu_check_says_in_one_line_when_there_is_no_gpu() -> None:
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "gpu_check.py")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device visible to PyTorch; this check needs an NVIDIA GPU (docs/gpu.md)"
    ]
    assert proc.stderr == ""


def test_torch_engine_runs_packed_batches_where_chosen(model_dirs: dict[str, Path]) -> None:
    """The serving hook: the PyTorch engine packs only on CUDA + flash-attn (never on this CPU), and when
    told to pack it returns the padded forward's raw scores and tells the batcher to budget real tokens."""
    from sidecar.scoring.device import Placement
    from sidecar.scoring.runtimes import EngineSpec, TorchEngine, _packs

    reference = _load(model_dirs["bert"], "sdpa")
    packed_model = _load(model_dirs["bert"], packing.register_reference_attention())
    cpu = Placement(device="cpu", dtype="float32", attention="sdpa")
    spec = EngineSpec(packed_model, "scores", packed_model.preprocess, None, cpu)
    assert not _packs(spec, cpu)
    assert not _packs(spec, Placement(device="cuda", dtype="bfloat16", attention="sdpa"))

    engine = TorchEngine(packed_model, "scores", torch.device("cpu"), "float32", False, packed=True)
    assert engine.padding_free
    features = packed_model.preprocess(_pairs())
    with torch.inference_mode():
        padded = reference(reference.preprocess(_pairs()))["scores"].float().reshape(-1)
    np.testing.assert_allclose(engine.run(features).numpy(), padded.numpy(), atol=1e-4, rtol=0)
