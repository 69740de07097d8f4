"""Inference runtimes behind the scorers' forward pass: PyTorch, OpenVINO and ONNX Runtime.

A scorer tokenizes (pre), calls `engine.run(features)` (core) and post-processes (post). An engine takes
the padded `input_ids` / `attention_mask` (/ `token_type_ids`) and returns float32 raw scores `[n]` for a
cross-encoder (before its activation) or sentence embeddings `[n, d]` for a bi-encoder. OpenVINO and ONNX
Runtime engines run a graph exported from the sentence-transformers module stack, kept in an export cache
keyed by the model's content hash and the export settings, so a restart does not export again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from sidecar.scoring.device import Placement, cpu_has_native_bf16, resolve

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "openvino", "onnxruntime")
# The tensors an exported graph takes, in this order, where the tokenizer produces them.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# Bumped when what we export changes shape, so old cache entries are never read by new code.
EXPORT_FORMAT = 1
CALIBRATION_BATCH = 8
# OpenVINO static int8 (docs/runtimes.md, "The int8 recipe"): NNCF's transformer scheme with SmoothQuant's
# alpha for matrix products lowered from NNCF's 0.95 to 0.5. Measured on SciFact train queries (never
# test), 0.95 lost 0.010-0.032 nDCG@10 against torch float32 on the packaged model; 0.5 kept it within the
# guard's 0.005 at int8 speed. Part of the export-cache key: changing it exports again.
INT8_RECIPE: dict[str, Any] = {"nncf_model_type": "transformer", "smooth_quant_matmul_alpha": 0.5}
_PACKAGES = {
    "torch": ("torch", "transformers", "sentence-transformers"),
    "openvino": ("torch", "transformers", "sentence-transformers", "openvino", "nncf"),
    "onnxruntime": ("torch", "transformers", "sentence-transformers", "onnx", "onnxruntime"),
}
_MODULES = {"openvino": ("openvino", "nncf"), "onnxruntime": ("onnx", "onnxruntime")}


# Every runtime x precision the sidecar can load on a CPU, by the key Info, the guard and --cascade use:
# RUNTIME/PRECISION -> (runtime, dtype, quantize).
CONFIGS: dict[str, tuple[str, str, str]] = {
    "torch/float32": ("torch", "float32", "none"),
    "torch/bfloat16": ("torch", "bfloat16", "none"),
    "torch/int8-dynamic": ("torch", "float32", "int8"),
    "openvino/float32": ("openvino", "float32", "none"),
    "openvino/bfloat16": ("openvino", "bfloat16", "none"),
    "openvino/int8": ("openvino", "float32", "int8"),
    "openvino/int8+bfloat16": ("openvino", "bfloat16", "int8"),
    "onnxruntime/float32": ("onnxruntime", "float32", "none"),
    "onnxruntime/int8": ("onnxruntime", "float32", "int8"),
}
# What a cascade's first pass may be: an exported graph, built beside the served engine from the same
# float32 weights (torch's dynamic int8 quantises the weights in place, so it cannot sit beside another).
CASCADE_FIRST_PASSES = tuple(k for k, (rt, _, _) in CONFIGS.items() if rt != "torch")


class RuntimeUnavailable(RuntimeError):
    """The runtime asked for cannot run this model here; the message says what to do instead."""


def resolve_runtime(settings: Any, source: Any) -> Any:
    """The settings to load with, `runtime` resolved. The one place where `auto` is decided.

    For now `auto` is PyTorch: a faster runtime is only picked where a measured quality guard allows it.
    """
    if settings.runtime == "auto":
        return settings.model_copy(update={"runtime": "torch"})
    return settings


def precision_name(runtime: str, dtype: str, quantize: str) -> str:
    """What Info, the log and /metrics call a runtime's precision (float32, bfloat16, int8, ...)."""
    if quantize == "int8":
        if runtime == "torch":
            return "int8-dynamic"
        return "int8+bfloat16" if dtype == "bfloat16" else "int8"
    return dtype


def placement_for(settings: Any) -> Placement:
    """Device, precision and attention for `settings.runtime` (already resolved).

    OpenVINO and ONNX Runtime run on the CPU. OpenVINO's `--dtype auto` is bf16 on CPUs with native bf16
    also under `--quantize int8` (static int8 keeps the rest in that precision); ONNX Runtime is float32.
    """
    runtime = settings.runtime
    if runtime == "torch":
        return resolve(settings.device, settings.dtype, settings.attention, settings.quantize)
    _require(runtime)
    if settings.device not in ("auto", "cpu"):
        raise RuntimeUnavailable(
            f"--runtime {runtime} runs on the CPU: use --device cpu (or --runtime torch)"
        )
    if settings.attention == "flash_attention_2":
        raise RuntimeUnavailable(f"--runtime {runtime} has no flash_attention_2: use --attention auto")
    dtype = settings.dtype
    if runtime == "openvino":
        if dtype == "auto":
            dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
        if dtype == "float16":
            raise RuntimeUnavailable("--runtime openvino on a CPU runs float32 or bfloat16: use --dtype auto")
        if dtype == "bfloat16" and not cpu_has_native_bf16():
            raise RuntimeUnavailable(
                "--runtime openvino --dtype bfloat16 needs a CPU with AMX or AVX512-BF16: use --dtype float32"
            )
    else:
        if dtype == "auto":
            dtype = "float32"
        if dtype != "float32":
            raise RuntimeUnavailable(
                "--runtime onnxruntime runs float32 on the CPU (int8 with --quantize int8): "
                "use --dtype float32"
            )
    return Placement(device="cpu", dtype=dtype, attention="sdpa")


def _require(runtime: str) -> None:
    import importlib

    missing = []
    for module in _MODULES[runtime]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise RuntimeUnavailable(
            f"--runtime {runtime} needs {', '.join(missing)}: pip install 'rerank-sidecar[cpu]' "
            "(or use --runtime torch)"
        )


def load_dtype(settings: Any, placement: Placement) -> str:
    """The precision the PyTorch model is loaded in: exports and CPU bf16 autocast start from float32."""
    if settings.runtime != "torch" or bf16_autocast(placement):
        return "float32"
    return placement.dtype


def bf16_autocast(placement: Placement) -> bool:
    """Torch bf16 on a CPU runs as autocast over float32 weights (the residual stream, LayerNorm and
    softmax stay float32) rather than a cast of the whole model: it keeps rankings closer to float32 at
    about the same speed (docs/runtimes.md)."""
    return placement.device == "cpu" and placement.dtype == "bfloat16"


# ---- engines -------------------------------------------------------------------------------------
class Engine(ABC):
    """The forward pass: features in, float32 raw scores `[n]` or embeddings `[n, d]` out."""

    runtime: str
    precision: str

    @abstractmethod
    def run(self, features: dict[str, Any]) -> Any:
        """Float32 torch tensor: raw scores `[n]` (cross-encoder) or embeddings `[n, d]` (bi-encoder);
        on the model's device for PyTorch, on the CPU for the others."""


class TorchEngine(Engine):
    runtime = "torch"

    def __init__(
        self, model: Any, output: str, device: Any, precision: str, autocast: bool, packed: bool = False
    ) -> None:
        self.model, self.output, self.device, self.precision = model, output, device, precision
        self._autocast = autocast
        # CUDA + flash-attn: batches run as one packed row without padding (sidecar/scoring/packing.py),
        # and the batcher counts their budget in real tokens.
        self.padding_free = packed

    def run(self, features: dict[str, Any]) -> Any:
        import torch

        if self.padding_free:
            from sidecar.scoring import packing

            with torch.inference_mode():
                return packing.packed_forward(self.model, features)

        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self._autocast else contextlib.nullcontext()
        moved = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}
        with torch.inference_mode(), ctx:
            out = self.model(moved)[self.output].float()
        return out.reshape(-1) if self.output == "scores" else out


class OpenVINOEngine(Engine):
    runtime = "openvino"

    def __init__(
        self, compiled: Any, inputs: Sequence[str], output: str, precision: str, folder: Path
    ) -> None:
        self.compiled, self.inputs, self.output, self.precision = compiled, tuple(inputs), output, precision
        self.folder = folder  # the export cache entry it was compiled from
        # One request, reused: the scorer calls from one thread at a time.
        self._request = compiled.create_infer_request()

    def run(self, features: dict[str, Any]) -> Any:
        import torch

        self._request.infer({n: _numpy(features[n]) for n in self.inputs})
        out = np.array(self._request.get_output_tensor(0).data, dtype=np.float32)
        t = torch.from_numpy(out)
        return t.reshape(-1) if self.output == "scores" else t


class ONNXRuntimeEngine(Engine):
    runtime = "onnxruntime"

    def __init__(
        self, session: Any, inputs: Sequence[str], output: str, precision: str, folder: Path
    ) -> None:
        self.session, self.inputs, self.output, self.precision = session, tuple(inputs), output, precision
        self.folder = folder  # the export cache entry it was loaded from

    def run(self, features: dict[str, Any]) -> Any:
        import torch

        (out,) = self.session.run(None, {n: _numpy(features[n]) for n in self.inputs})
        t = torch.from_numpy(np.asarray(out, dtype=np.float32))
        return t.reshape(-1) if self.output == "scores" else t


def _numpy(value: Any) -> np.ndarray:
    return np.ascontiguousarray(value.detach().cpu().numpy().astype(np.int64, copy=False))


# ---- building an engine ----------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSpec:
    """What an engine is built from: the loaded sentence-transformers model and how to read it."""

    model: Any  # CrossEncoder or SentenceTransformer, float32 for exports
    output: str  # "scores" or "sentence_embedding"
    # Tokenizes a list of calibration (query, document) pairs into the model's features.
    featurize: Callable[[list[tuple[str, str]]], dict[str, Any]]
    source: Any  # ModelSource
    placement: Placement


def build_engine(spec: EngineSpec, settings: Any) -> Engine:
    """The engine for `settings.runtime` (resolved), exporting into the cache when needed."""
    runtime, placement, quantize = settings.runtime, spec.placement, settings.quantize
    precision = precision_name(runtime, placement.dtype, quantize)
    if runtime == "torch":
        import torch

        return TorchEngine(
            spec.model,
            spec.output,
            torch.device(placement.device),
            precision,
            bf16_autocast(placement),
            packed=_packs(spec, placement),
        )
    _refuse_unexportable(spec, runtime)
    # Only static int8 reads calibration data (ONNX Runtime's dynamic int8 measures each batch).
    static_int8 = quantize == "int8" and runtime == "openvino"
    pairs = calibration_pairs(settings.calibration_file) if static_int8 else []
    sample = spec.featurize([("what is a reranker", "A reranker orders documents."), ("q", "a b c d e f")])
    inputs = [n for n in INPUT_NAMES if n in sample]
    key = _cache_key(spec, runtime, quantize, pairs, inputs)
    root = _writable_root(Path(settings.export_cache_dir).expanduser())
    folder = root / f"{_slug(spec.source.model_id)}-{runtime}-{quantize}-{key[:16]}"
    if folder.is_dir():
        log.info("export cache: reusing %s", folder)
    else:
        log.info(
            "export cache: exporting %s for %s (%s) into %s", spec.source.model_id, runtime, quantize, root
        )
        start = time.perf_counter()
        exporter = _export_openvino if runtime == "openvino" else _export_onnxruntime
        try:
            _write_atomically(
                folder,
                lambda tmp: exporter(spec, sample, inputs, quantize, pairs, tmp),
                _key_record(key, spec),
            )
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise RuntimeUnavailable(
                f"--runtime {runtime} could not export {spec.source.model_id} "
                f"({type(exc).__name__}: {first}): use --runtime torch"
            ) from exc
        log.info("export cache: exported in %.1fs", time.perf_counter() - start)
    if runtime == "openvino":
        return _load_openvino(folder, inputs, spec.output, placement, precision)
    return _load_onnxruntime(folder, inputs, spec.output, precision)


def _packs(spec: EngineSpec, placement: Placement) -> bool:
    """Whether the PyTorch engine runs batches packed without padding: cross-encoders on CUDA with
    flash-attn varlen. Where it cannot, one log line says why."""
    if spec.output != "scores" or not placement.device.startswith("cuda"):
        return False
    if placement.attention != "flash_attention_2":
        return False
    from sidecar.scoring import packing

    reason = packing.why_not_packed(spec.model)
    if reason:
        log.info("batches stay padded: %s", reason)
    return reason is None


def _refuse_unexportable(spec: EngineSpec, runtime: str) -> None:
    try:
        from sentence_transformers.cross_encoder.modules import LogitScore
    except ImportError:
        return
    if any(isinstance(m, LogitScore) for m in spec.model):
        raise RuntimeUnavailable(
            f"--runtime {runtime} cannot export {spec.source.model_id} (a causal-LM reranker): "
            "use --runtime torch"
        )


def _traceable(spec: EngineSpec, sample: dict[str, Any]) -> Any:
    """The torch module an exporter traces: the sentence-transformers stack with tensor inputs."""
    import torch

    # Non-tensor features (e.g. sentence-transformers' `modality`) are constants of the graph.
    extra = {k: v for k, v in sample.items() if not isinstance(v, torch.Tensor)}

    class Core(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = spec.model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            features = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
            if token_type_ids is not None:
                features["token_type_ids"] = token_type_ids
            return self.st(features)[spec.output]

    return Core().eval()


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    """Where a model is traced for export: gradients off but outside inference mode (tracers need real
    tensors), and without the tracer's warnings about Python control flow on shapes."""
    import torch

    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export_openvino(
    spec: EngineSpec,
    sample: dict[str, Any],
    inputs: list[str],
    quantize: str,
    pairs: list[tuple[str, str]],
    out: Path,
) -> None:
    import openvino as ov

    core = _traceable(spec, sample)
    example = {n: sample[n] for n in inputs}
    with _tracing():
        model = ov.convert_model(core, example_input=example)
    if quantize == "int8":
        import nncf

        nncf.set_log_level(logging.ERROR)
        batches = [
            {n: _numpy(v) for n, v in spec.featurize(chunk).items() if n in inputs}
            for chunk in _chunks(pairs, CALIBRATION_BATCH)
        ]
        # NNCF draws progress bars on stdout; a server log is no place for them.
        with contextlib.redirect_stdout(io.StringIO()):
            model = nncf.quantize(
                model,
                nncf.Dataset(batches),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(batches) * CALIBRATION_BATCH,
                advanced_parameters=nncf.AdvancedQuantizationParameters(
                    smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(
                        matmul=INT8_RECIPE["smooth_quant_matmul_alpha"]
                    )
                ),
            )
    ov.save_model(model, out / "model.xml", compress_to_fp16=False)


def _load_openvino(
    folder: Path, inputs: list[str], output: str, placement: Placement, precision: str
) -> Engine:
    import openvino as ov

    from sidecar.threads import usable_cores

    core = ov.Core()
    hint = "bf16" if placement.dtype == "bfloat16" else "f32"
    # Threads as for torch (sidecar/threads.py): the cores this process may use, a container's CPU quota
    # included (OpenVINO would otherwise size its pool by the node's cores).
    config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": usable_cores()}
    compiled = core.compile_model(core.read_model(folder / "model.xml"), "CPU", config)
    return OpenVINOEngine(compiled, inputs, output, precision, folder)


def _export_onnxruntime(
    spec: EngineSpec,
    sample: dict[str, Any],
    inputs: list[str],
    quantize: str,
    pairs: list[tuple[str, str]],
    out: Path,
) -> None:
    import torch

    core = _traceable(spec, sample)
    exported = out / "model.onnx"
    with _tracing():
        # The TorchScript exporter: the dynamo one needs onnxscript, and traces these graphs no better.
        torch.onnx.export(
            core,
            (),
            str(exported),
            kwargs={n: sample[n] for n in inputs},
            input_names=inputs,
            output_names=[spec.output],
            dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in inputs}, spec.output: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    if quantize == "int8":
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Fuse first (attention, GELU, LayerNorm), then quantise the fused graph's matrix products.
        fused = out / "fused.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(fused)
        ort.InferenceSession(str(exported), opts, providers=["CPUExecutionProvider"])
        import onnx

        quantize_dynamic(
            str(fused),
            str(out / "model.int8.onnx"),
            weight_type=QuantType.QInt8,
            # Fused contrib ops carry no inferred types; their tensors are float32.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        fused.unlink()
        exported.unlink()
        (out / "model.int8.onnx").rename(exported)


def _load_onnxruntime(folder: Path, inputs: list[str], output: str, precision: str) -> Engine:
    import onnxruntime as ort

    from sidecar.threads import usable_cores

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = usable_cores()  # as for torch and OpenVINO: a CPU quota is respected
    opts.inter_op_num_threads = 1  # one graph runs at a time (the model thread)
    session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    return ONNXRuntimeEngine(session, inputs, output, precision, folder)


# ---- the export cache ------------------------------------------------------------------------------
def _cache_key(
    spec: EngineSpec, runtime: str, quantize: str, pairs: list[tuple[str, str]], inputs: list[str]
) -> str:
    parts = {
        "format": EXPORT_FORMAT,
        "model": model_content_id(spec.source),
        "output": spec.output,
        "inputs": inputs,
        "runtime": runtime,
        "quantize": quantize,
        "calibration": pairs_hash(pairs) if pairs else None,
        "int8_recipe": INT8_RECIPE if pairs else None,  # static int8 only
        "versions": {p: _version(p) for p in _PACKAGES[runtime]},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _key_record(key: str, spec: EngineSpec) -> dict[str, Any]:
    return {"key": key, "model": spec.source.model_id, "revision": model_content_id(spec.source)}


def model_content_id(source: Any) -> str:
    """The content hash of a local model directory; for a hub id, the commit its cached files came from."""
    if source.local:
        return str(source.revision)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source.path_or_id, "config.json", revision=source.revision)
        if isinstance(found, str):
            return f"{source.path_or_id}@{Path(found).parent.name}"
    except Exception:  # an unknown commit only makes the key less specific
        pass
    return f"{source.path_or_id}@{source.revision}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[-60:] or "model"


def _writable_root(root: Path) -> Path:
    """The cache root, or a fresh temporary directory when it cannot be written (a read-only volume):
    the sidecar still starts, and says that every start will export again."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
        return root
    except OSError as exc:
        fallback = Path(tempfile.mkdtemp(prefix="rerank-exports-"))
        log.warning(
            "export cache %s cannot be written (%s): exporting into %s, so every start exports again; "
            "point --export-cache-dir at a writable volume",
            root,
            exc.strerror or exc,
            fallback,
        )
        return fallback


def _write_atomically(folder: Path, write: Callable[[Path], None], record: dict[str, Any]) -> None:
    """Write into a temporary directory beside `folder`, then rename: a crash or a concurrent start
    never leaves a half-written entry that a later start would read."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        write(tmp)
        (tmp / "key.json").write_text(json.dumps(record, indent=2, sort_keys=True))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # not another process's finished entry: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---- calibration -----------------------------------------------------------------------------------
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[1] / "data" / "calibration_pairs.jsonl"


def calibration_pairs(path: str | Path | None) -> list[tuple[str, str]]:
    """(query, document) pairs from a JSONL file ({"query": ..., "document": ...} per line); None reads
    the built-in set. A bad file is refused with one line naming the line at fault."""
    file = Path(path).expanduser() if path is not None else DEFAULT_CALIBRATION
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"--calibration-file {file}: cannot read it ({exc.strerror})") from None
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            query, document = row["query"], row["document"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"--calibration-file {file} line {number}: expected a JSON object with string fields "
                '"query" and "document"'
            ) from None
        if not isinstance(query, str) or not isinstance(document, str) or not query or not document:
            raise ValueError(
                f'--calibration-file {file} line {number}: "query" and "document" must be non-empty strings'
            )
        pairs.append((query, document))
    if not pairs:
        raise ValueError(f"--calibration-file {file} holds no pairs")
    return pairs


def pairs_hash(pairs: Iterable[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps(list(pairs)).encode()).hexdigest()[:16]


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
