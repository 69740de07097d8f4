"""What `--dtype auto` picks on each kind of CPU, and what bf16 costs against float32.

The placement's own `auto` (`device.auto_dtype`) follows the hardware; what a CPU actually loads under
`--dtype auto` is then decided by the model's quality-guard record (sidecar/scoring/auto_runtime.py): float32
without one, even on CPUs with native bf16 (bf16 before the guard existed), and for the packaged model the
fastest configuration its shipped record passed. The choice is tested with the CPU's answer pinned both
ways; the bf16 scorers run with an explicit `dtype="bfloat16"` on whatever CPU runs the tests (emulated,
hence slow, on AVX2-only machines: the pairs here are few and short).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sidecar.scoring import device
from sidecar.scoring.base import Pair
from tests.conftest import make_scorer

# bf16 keeps 8 bits of mantissa (about 3 significant digits). Measured on these pairs (AVX512-BF16 EPYC):
# max |diff| 0.0019 for the tiny BERT logits and 0.0023 for the packaged model's cosines; the bars leave
# room for other CPUs' kernels (AMX, emulated bf16 on AVX2).
BF16_TOL_LOGIT = 0.03
BF16_TOL_COSINE = 0.02


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    assert device.auto_dtype(on_cuda=False) == ("bfloat16" if native else "float32")
    assert device.resolve("cpu", "auto", "auto").dtype == ("bfloat16" if native else "float32")
    # Dynamic int8 keeps float32 activations: with it, auto is float32 on every CPU.
    assert device.auto_dtype(on_cuda=False, quantize="int8") == "float32"
    assert device.resolve("cpu", "auto", "auto", quantize="int8").dtype == "float32"
    # An explicit choice is never second-guessed.
    assert device.resolve("cpu", "float32", "auto").dtype == "float32"
    assert device.resolve("cpu", "bfloat16", "auto").dtype == "bfloat16"


def test_auto_on_cuda_prefers_bf16_then_fp16() -> None:
    assert device.auto_dtype(on_cuda=True, cuda_bf16=True) == "bfloat16"
    assert device.auto_dtype(on_cuda=True, cuda_bf16=False) == "float16"
    assert device.auto_dtype(on_cuda=True, quantize="int8", cuda_bf16=True) == "bfloat16"


@pytest.mark.parametrize("native", [True, False])
def test_documented_int8_command_works_whatever_auto_picks(
    native: bool, bert_ce_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    scorer = make_scorer(bert_ce_dir, dtype="auto", quantize="int8")
    assert scorer.info.dtype == "int8-dynamic"
    scores = scorer.score([Pair("q", "a document"), Pair("q", "another one")])
    assert scores.shape == (2,) and np.all(np.isfinite(scores))


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_a_cpu_is_float32_without_a_guard_record(
    native: bool, bert_ce_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RERANK_EXPORT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    scorer = make_scorer(bert_ce_dir, dtype="auto", device="cpu")
    assert scorer.info.dtype == "float32"


@pytest.mark.parametrize("native", [True, False])
def test_packaged_model_auto_follows_its_shipped_guard_record(
    native: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default model stays fast: `auto` takes the fastest configuration its record passed that the CPU
    can run (bf16 only with native bf16), chosen here from the record's rows by a plain max."""
    from sidecar.model_factory import packaged_embedding_model_dir
    from sidecar.scoring.auto_runtime import resolve_settings, runtimes_available
    from sidecar.scoring.loading import resolve_source
    from sidecar.settings import Settings

    monkeypatch.setenv("RERANK_EXPORT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    record = json.loads((packaged_embedding_model_dir() / "guard.json").read_text())
    usable = [
        r
        for r in record["configs"]
        if r["passed"] and r["runtime"] in runtimes_available() and (native or r["dtype"] != "bfloat16")
    ]
    want = max(usable, key=lambda r: r["pairs_per_s"])
    settings, why = resolve_settings(Settings(dtype="auto", device="cpu"), resolve_source(None, None))
    assert (settings.runtime, settings.dtype, settings.quantize) == (
        want["runtime"],
        want["dtype"],
        want["quantize"],
    )
    assert "guard.json" in why
    if native:
        assert want["precision"] != "float32" or want["runtime"] != "torch", "the packaged default got slow"


def _pairs() -> list[Pair]:
    docs = [
        "Vaccines train the immune system to recognise and fight a specific pathogen.",
        "The stock market fell sharply after the central bank raised interest rates.",
        "A recipe for banana bread with walnuts and brown sugar.",
        "Antibodies produced after immunisation neutralise the virus before it enters cells.",
        "Protein folding is driven by the hydrophobic effect.",
        "Interest rates and inflation move together in most economies.",
    ]
    queries = ["how do vaccines protect against disease", "why did stocks drop", "baking with bananas"]
    return [Pair(q, d) for q in queries for d in docs]


def test_bf16_cross_encoder_stays_within_tolerance(bert_ce_dir: Path) -> None:
    pairs = _pairs()
    fp32 = make_scorer(bert_ce_dir, dtype="float32").score(pairs)
    bf16_scorer = make_scorer(bert_ce_dir, dtype="bfloat16")
    assert bf16_scorer.info.dtype == "bfloat16"
    bf16 = bf16_scorer.score(pairs)
    assert np.max(np.abs(bf16 - fp32)) <= BF16_TOL_LOGIT
    assert np.max(np.abs(bf16 - fp32)) > 0  # it really ran in another precision


def test_bf16_packaged_model_keeps_the_ranking(packaged_scorer) -> None:  # type: ignore[no-untyped-def]
    pairs = _pairs()
    fp32 = packaged_scorer.score(pairs)
    assert packaged_scorer.info.dtype == "float32"
    bf16 = make_scorer(None, dtype="bfloat16", embedding_cache_bytes=0).score(pairs)
    assert np.max(np.abs(bf16 - fp32)) <= BF16_TOL_COSINE
    # A trained model separates relevant from irrelevant by far more than bf16's error: per query, the
    # two relevant documents stay the top two, in the same order.
    for q in range(3):
        ref, got = fp32[q * 6 : q * 6 + 6], bf16[q * 6 : q * 6 + 6]
        assert list(np.argsort(-got)[:2]) == list(np.argsort(-ref)[:2])
