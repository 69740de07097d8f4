"""Every runtime x precision against the sentence-transformers reference (`CrossEncoder.predict`,
`SentenceTransformer.encode`, float32 PyTorch), on tiny random models built here and the packaged model.

Tolerances (scores after the model's activation for cross-encoders, cosines for bi-encoders), with the
largest differences measured on an AVX512-BF16 EPYC: float32 runtimes 1e-4 (measured <= 3e-7); bf16 0.03
(measured <= 4.1e-3); int8 0.05 (measured <= 1.3e-2 on the tiny models). Lower precisions must also
differ from float32 somewhere, so a runtime that silently ran float32 fails.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from sidecar.scoring.base import Pair, Scorer
from sidecar.scoring.device import cpu_has_native_bf16
from tests.conftest import make_scorer
from tests.texts import documents, queries

FP32_TOL = 1e-4
BF16_TOL = 0.03
INT8_TOL = 0.05

# (runtime, dtype, quantize) -> (precision reported, tolerance)
CONFIGS = {
    ("openvino", "float32", "none"): ("float32", FP32_TOL),
    ("openvino", "bfloat16", "none"): ("bfloat16", BF16_TOL),
    ("openvino", "float32", "int8"): ("int8", INT8_TOL),
    ("openvino", "bfloat16", "int8"): ("int8+bfloat16", INT8_TOL),
    ("onnxruntime", "float32", "none"): ("float32", FP32_TOL),
    ("onnxruntime", "float32", "int8"): ("int8", INT8_TOL),
    ("torch", "bfloat16", "none"): ("bfloat16", BF16_TOL),
    ("torch", "float32", "int8"): ("int8-dynamic", INT8_TOL),
}
MODELS = ["bert_ce_dir", "modernbert_ce_dir", "bi_encoder_dir"]


def _pairs() -> list[Pair]:
    return [Pair(q, d) for q in queries(3) for d in documents(8)]


def _reference(model_dir: Path, pairs: list[Pair]) -> np.ndarray:
    from sentence_transformers import CrossEncoder, SentenceTransformer

    if (model_dir / "modules.json").exists() and not _is_cross_encoder(model_dir):
        st = SentenceTransformer(str(model_dir), device="cpu")
        q = st.encode([p.query for p in pairs], normalize_embeddings=True)
        d = st.encode([p.document for p in pairs], normalize_embeddings=True)
        return np.sum(q * d, axis=1)
    return CrossEncoder(str(model_dir), device="cpu").predict([(p.query, p.document) for p in pairs])


def _is_cross_encoder(model_dir: Path) -> bool:
    cfg = model_dir / "config_sentence_transformers.json"
    return cfg.exists() and '"CrossEncoder"' in cfg.read_text()


_references: dict[Path, np.ndarray] = {}


def _scored(scorer: Scorer, model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    pairs = _pairs()
    if model_dir not in _references:
        _references[model_dir] = _reference(model_dir, pairs)
    return scorer.score(pairs), _references[model_dir]


def _int8_layers(engine: object) -> int:
    """Matrix products that run in int8 in what the engine executes."""
    from sidecar.scoring.runtimes import ONNXRuntimeEngine, OpenVINOEngine

    if isinstance(engine, OpenVINOEngine):
        count = collections.Counter(
            op.get_rt_info()["runtimePrecision"].astype(str)
            for op in engine.compiled.get_runtime_model().get_ops()
            if op.get_rt_info()["layerType"].astype(str) in ("FullyConnected", "MatMul")
        )
        return count["i8"] + count["u8"]
    if isinstance(engine, ONNXRuntimeEngine):
        import onnx

        graph = onnx.load(str(engine.folder / "model.onnx")).graph
        return sum(n.op_type in ("MatMulInteger", "QAttention", "DynamicQuantizeMatMul") for n in graph.node)

    return sum(type(m).__module__.startswith("torch.ao.nn.quantized") for m in engine.model.modules())  # type: ignore[attr-defined]


@pytest.mark.parametrize("model_fixture", MODELS)
@pytest.mark.parametrize("config", list(CONFIGS), ids="-".join)
def test_runtime_matches_sentence_transformers(
    model_fixture: str, config: tuple[str, str, str], export_dir: Path, request: pytest.FixtureRequest
) -> None:
    runtime, dtype, quantize = config
    precision, tol = CONFIGS[config]
    if runtime == "openvino" and "bfloat16" in dtype and not cpu_has_native_bf16():
        # serve refuses this combination there (tested in test_runtime_serving); torch bf16 (autocast,
        # emulated where not native) runs on every CPU, so it is compared everywhere.
        pytest.skip("OpenVINO bf16 runs only on CPUs with AMX / AVX512-BF16")
    model_dir: Path = request.getfixturevalue(model_fixture)
    scorer = make_scorer(
        model_dir, runtime=runtime, dtype=dtype, quantize=quantize, export_cache_dir=str(export_dir)
    )
    assert (scorer.info.runtime, scorer.info.dtype) == (runtime, precision)
    scores, reference = _scored(scorer, model_dir)
    assert np.std(reference) > 1e-3, "flat reference scores would make the comparison vacuous"
    diff = float(np.max(np.abs(scores - reference)))
    assert diff <= tol, f"{config}: max |diff| {diff:.2e} > {tol}"
    if precision != "float32":
        assert diff > 0, f"{config}: identical to float32, so it did not run in {precision}"
    if "int8" in precision:
        assert _int8_layers(scorer.engine) > 0  # type: ignore[attr-defined]
    if runtime == "openvino":
        hint = scorer.engine.compiled.get_property("INFERENCE_PRECISION_HINT")  # type: ignore[attr-defined]
        assert str(hint) == ("<Type: 'bfloat16'>" if dtype == "bfloat16" else "<Type: 'float32'>")


def test_engine_returns_raw_scores_before_the_activation(bert_ce_dir: Path, export_dir: Path) -> None:
    """The scorer applies the activation once: the engine's output is the head's raw logit."""
    import torch
    from sentence_transformers import CrossEncoder

    scorer = make_scorer(bert_ce_dir, runtime="openvino", dtype="float32", export_cache_dir=str(export_dir))
    ce = CrossEncoder(str(bert_ce_dir), device="cpu")
    texts = [(p.query, p.document) for p in _pairs()]
    features = ce.preprocess(texts)
    with torch.inference_mode():
        raw = ce(features)["scores"].reshape(-1)
    out = scorer.engine.run(features)  # type: ignore[attr-defined]
    assert out.dtype == torch.float32 and out.shape == (len(texts),)
    torch.testing.assert_close(out, raw, atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime", "torch"])
def test_documented_int8_command_works_with_dtype_auto(
    runtime: str, bert_ce_dir: Path, export_dir: Path
) -> None:
    scorer = make_scorer(
        bert_ce_dir, runtime=runtime, dtype="auto", quantize="int8", export_cache_dir=str(export_dir)
    )
    expected = {
        "openvino": "int8+bfloat16" if cpu_has_native_bf16() else "int8",
        "onnxruntime": "int8",
        "torch": "int8-dynamic",
    }[runtime]
    assert scorer.info.dtype == expected
    scores, reference = _scored(scorer, bert_ce_dir)
    assert np.max(np.abs(scores - reference)) <= INT8_TOL
