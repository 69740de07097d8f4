"""Benchmark: the running sidecar, one configuration (runtime x precision) or a matrix of them, against
sentence-transformers `CrossEncoder.predict` (fp32, batch 32, per request) on the same model and the same
SciFact pairs, timed once in the same run.

Pairs are natural-length SciFact (title + text) BM25 top-`depth` hits of the first `queries` test
queries. The model is a MiniLM-L6-shaped cross-encoder (random weights unless --model is given). Per
configuration: throughput under N concurrent gRPC clients, its ratio to the baseline, latency
percentiles, ranking agreement with the baseline, effective GFLOP/s as a share of the matmul ceiling
measured in the same run, and a lone request's latency against its pure compute time (the same pairs
scored in-process by the same engine and settings, with no server). BENCHMARKS.md explains each figure.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import tempfile
import threading
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

RUNTIMES = ("torch", "openvino", "onnxruntime")
PRECISIONS = ("float32", "bfloat16", "int8", "int8+bfloat16")
# What each precision means as `serve` flags (the contract's names: int8 keeps the rest at --dtype).
PRECISION_FLAGS = {
    "float32": ["--dtype", "float32", "--quantize", "none"],
    "bfloat16": ["--dtype", "bfloat16", "--quantize", "none"],
    "int8": ["--quantize", "int8", "--dtype", "float32"],
    "int8+bfloat16": ["--quantize", "int8", "--dtype", "bfloat16"],
}
# The import each runtime needs besides torch.
RUNTIME_PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")
BASELINE_NAME = "sentence-transformers predict, per request (fp32, bs 32)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset-dir", default=None, help="BEIR directory (default: ../shared/data/beir/scifact)"
    )
    p.add_argument("--queries", type=int, default=16, help="test queries to replay")
    p.add_argument("--depth", type=int, default=100, help="BM25 hits per query (pairs per request)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    p.add_argument("--model", default=None, help="cross-encoder directory (default: random MiniLM-L6-shaped)")
    p.add_argument(
        "--runtime",
        choices=("auto", *RUNTIMES),
        default=None,
        help="inference runtime of the benchmarked sidecar (`serve --runtime`; default: serve's own)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="float32 | bfloat16 | int8 (= --quantize int8 --dtype float32) | int8+bfloat16 "
        "(= --quantize int8 --dtype bfloat16); default: serve's own (--dtype auto)",
    )
    p.add_argument(
        "--matrix",
        nargs="?",
        const="all",
        default=None,
        metavar="RUNTIME:PRECISION,...",
        help="benchmark several configurations in one run, e.g. torch:float32,openvino:int8+bfloat16; "
        "alone: every runtime x precision this machine can run (the others are listed with the reason)",
    )
    p.add_argument(
        "--lone-repeats",
        type=int,
        default=3,
        help="repeats of the lone top-`depth` request and of its in-process pure compute (0: skip both)",
    )
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="extra `serve` flag for every configuration, e.g. --serve-arg=--max-batch-tokens=4096 (a "
        "configuration's own --runtime / --dtype / --quantize come after it and win)",
    )
    p.add_argument("--skip-global-baseline", action="store_true", help="time only the per-request baseline")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument(
        "--markdown", default=None, help="write the report as markdown (BENCHMARKS.md tables) here"
    )


# ---- configurations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    runtime: str | None  # None: serve's default
    precision: str | None  # None: serve's default (--dtype auto)
    # A cascade's first pass (RUNTIME/PRECISION, `serve --cascade`) and depth; None: serve's default.
    cascade: str | None = None
    cascade_depth: int | None = None

    @property
    def label(self) -> str:
        label = f"{self.runtime or 'default'}:{self.precision or 'default'}"
        return label + (f" after {self.cascade}@{self.cascade_depth}" if self.cascade else "")

    def serve_flags(self) -> list[str]:
        # Before `serve --runtime` exists, torch is the only runtime and takes no flag.
        flags = ["--runtime", self.runtime] if self.runtime and served_runtimes() else []
        flags += PRECISION_FLAGS[self.precision] if self.precision else []
        if self.cascade:
            flags += ["--cascade", self.cascade, "--cascade-depth", str(self.cascade_depth)]
        return flags


def parse_matrix(spec: str) -> list[Config]:
    """'all' -> every runtime x precision; else 'runtime:precision,...' ('auto' allowed for either), each
    optionally '>FIRST@DEPTH' for a cascade (a first pass RUNTIME/PRECISION, e.g. openvino/int8)."""
    if spec == "all":
        return [Config(r, p) for r in RUNTIMES for p in PRECISIONS]
    from sidecar.scoring.runtimes import CASCADE_FIRST_PASSES

    out = []
    for item in (s.strip() for s in spec.split(",")):
        served, arrow, first = item.partition(">")
        runtime, sep, precision = served.partition(":")
        if not sep or runtime not in ("auto", *RUNTIMES) or precision not in ("auto", *PRECISIONS):
            raise ValueError(
                f"--matrix entry {item!r}: expected RUNTIME:PRECISION with RUNTIME in "
                f"{'|'.join(('auto', *RUNTIMES))} and PRECISION in {'|'.join(('auto', *PRECISIONS))}"
            )
        cascade, depth = None, None
        if arrow:
            cascade, _, depth_text = first.partition("@")
            if cascade not in CASCADE_FIRST_PASSES or not depth_text.isdigit() or int(depth_text) < 1:
                raise ValueError(
                    f"--matrix entry {item!r}: a cascade is RUNTIME:PRECISION>FIRST@DEPTH with FIRST in "
                    f"{'|'.join(CASCADE_FIRST_PASSES)}, e.g. openvino:bfloat16>openvino/int8@20"
                )
            depth = int(depth_text)
        out.append(Config(runtime, None if precision == "auto" else precision, cascade, depth))
    return out


def served_runtimes() -> tuple[str, ...]:
    """The runtimes this sidecar's `serve --runtime` accepts (none before the setting exists)."""
    from sidecar.settings import Settings

    field = Settings.model_fields.get("runtime")
    return tuple(typing.get_args(field.annotation)) if field is not None else ()


def unavailable(config: Config, native_bf16: bool) -> str | None:
    """Why this machine / this build cannot run `config`, or None."""
    runtime, served = config.runtime, served_runtimes()
    if runtime is not None and runtime not in (served or ("auto", "torch")):
        return f"this sidecar has no `serve --runtime {runtime}`" + ("" if served else " (torch only)")
    if runtime in RUNTIME_PACKAGES:
        try:
            importlib.import_module(RUNTIME_PACKAGES[runtime])
        except ImportError as exc:
            return (
                f"{RUNTIME_PACKAGES[runtime]} cannot be imported ({exc}); pip install 'rerank-sidecar[cpu]'"
            )
    if config.precision in ("bfloat16", "int8+bfloat16") and not native_bf16:
        return "no native bf16 on this CPU (AVX512-BF16 or AMX): emulated bf16 is slower than float32"
    if runtime == "torch" and config.precision == "int8+bfloat16":
        return "torch's dynamic int8 keeps float32 activations (int8+bfloat16 is a static-int8 runtime's)"
    return None


def refused_settings(config: Config, model_dir: Path, serve_args: list[str]) -> str | None:
    """What `serve` would refuse these flags with, found without starting one (a runtime's placement
    rules: e.g. ONNX Runtime runs float32 and int8 only); None when they pass or cannot be checked here."""
    from pydantic import ValidationError

    try:
        settings = _serve_settings(model_dir, serve_args)
    except ValidationError as exc:  # as `serve` words it
        error = exc.errors()[0]
        where = ".".join(str(x) for x in error["loc"])
        return f"invalid setting {where}: {str(error['msg']).removeprefix('Value error, ')}"
    except ValueError as exc:
        return str(exc)
    if config.runtime in (None, "auto"):
        return None  # resolving `auto` needs the model; `serve` itself will say
    try:
        from sidecar.scoring import runtimes
    except ImportError:  # a sidecar without runtimes: torch only, refused above otherwise
        return None
    try:
        runtimes.placement_for(settings)
    except (runtimes.RuntimeUnavailable, ValueError) as exc:
        return str(exc)
    return None


# ---- the machine ------------------------------------------------------------------------------


def hardware() -> dict[str, Any]:
    """CPU model, cores, the flags that decide which kernels run, and the library versions."""
    import torch

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    flags_line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    present = set(flags_line.partition(":")[2].split())
    model = next(
        (ln.partition(":")[2].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    versions: dict[str, str | None] = {}
    for package in ("torch", "openvino", "onnxruntime", "sentence_transformers", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    from sidecar.scoring.device import cpu_has_native_bf16

    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "sidecar_threads": sidecar_threads(),
        "flags": {f: f in present for f in CPU_FLAGS},
        "native_bf16": cpu_has_native_bf16(),
        "versions": versions,
    }


def matmul_gflops(dtype_name: str, size: int, min_seconds: float = 1.0) -> float:
    """GFLOP/s of size x size matmuls in `dtype_name`, repeated for at least `min_seconds`."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up: the first call picks kernels and touches memory
    n, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_seconds or n < 2:
        a @ b
        n += 1
    return 2 * size**3 * n / elapsed / 1e9


def sidecar_threads() -> int:
    """The intra-op threads a `serve` on this machine gives its model: the usable cores where the sidecar
    sets them (sidecar/threads.py), else PyTorch's default."""
    try:
        from sidecar.threads import usable_cores
    except ImportError:
        import torch

        return int(torch.get_num_threads())
    return usable_cores()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """PyTorch's intra-op threads at `n` inside the block (the baseline keeps PyTorch's default)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ceilings(native_bf16: bool, size: int = 2048) -> dict[str, Any]:
    """fp32 and bf16 matmul peaks at the thread count the sidecar gives its model (`sidecar_threads`)."""
    import torch

    # Emulated bf16 runs at well under 1 GFLOP/s: a 2048^2 product would take a minute, 512^2 shows it.
    bf16_size = size if native_bf16 else 512
    with torch_threads(sidecar_threads()):
        return {
            "threads": torch.get_num_threads(),
            "float32": {"gflops": matmul_gflops("float32", size), "size": size},
            "bfloat16": {
                "gflops": matmul_gflops("bfloat16", bf16_size),
                "size": bf16_size,
                "native": native_bf16,
                "note": "native (AVX512-BF16/AMX)" if native_bf16 else "emulated: not a meaningful ceiling",
            },
        }


# ---- the work ---------------------------------------------------------------------------------


def _pairs(args: argparse.Namespace) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """[(query, [(doc_id, title, text), ...])] for the first `queries` test queries."""
    from sidecar.eval import datasets
    from sidecar.eval.bm25 import LuceneBm25

    path, name = datasets.resolve(args.dataset_dir, "scifact", download_ok=True)
    ds = datasets.load(path, "test", name)
    bm25 = LuceneBm25(ds)
    out = []
    for qid in ds.query_ids(args.queries):
        q = ds.queries[qid]
        hits = bm25.search(q, args.depth)
        out.append((q, [(h.doc_id, ds.corpus[h.doc_id].title, ds.corpus[h.doc_id].text) for h in hits]))
    bm25.close()
    return out


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from sidecar.eval.cache import cache_dir
    from sidecar.model_factory import build_minilm_l6_cross_encoder

    target = cache_dir() / "bench" / "minilm-l6-random-ce"
    if not (target / "config.json").exists():
        build_minilm_l6_cross_encoder(target)
    return target


def _texts(work: list) -> list[list[tuple[str, str]]]:
    """Per query, the (query, 'title text') pairs every configuration reads."""
    return [[(q, f"{t} {x}" if t else x) for _, t, x in docs] for q, docs in work]


def model_shape(model_dir: Path) -> dict[str, Any]:
    """Layers, hidden size and the weights of the encoder layers' matmuls (counted on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    per_layer = re.compile(r"(^|\.)layers?\.\d+\.")
    params = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and per_layer.search(name + ".")
    )
    return {
        "layers": int(config.num_hidden_layers),
        "hidden": int(config.hidden_size),
        "matmul_params": int(params),
    }


def pair_flops(lengths: np.ndarray, shape: dict[str, Any]) -> np.ndarray:
    """FLOPs of one forward pass per pair of L real tokens: 2 x matmul weights x L (every token goes
    through every Linear once, a multiply and an add per weight) + 4 x L^2 x hidden per layer (Q.K^T
    and attention x V). Embeddings, norms, softmax and the one-token head are left out (< 1%)."""
    L = lengths.astype(np.float64)
    return 2.0 * shape["matmul_params"] * L + 4.0 * L**2 * shape["hidden"] * shape["layers"]


def _token_lengths(model_dir: Path, work: list) -> tuple[np.ndarray, int]:
    """Untruncated tokens per pair, and the model's length limit."""
    from transformers import AutoConfig, AutoTokenizer

    from sidecar.scoring._st import model_max_length

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    limit = model_max_length(tok.model_max_length, AutoConfig.from_pretrained(str(model_dir)))
    lengths = [
        len(tok(q, d, truncation=False, verbose=False)["input_ids"])
        for pairs in _texts(work)
        for q, d in pairs
    ]
    return np.asarray(lengths), limit


def _workload(model_dir: Path, work: list) -> dict[str, Any]:
    lengths, limit = _token_lengths(model_dir, work)
    read = np.minimum(lengths, limit)  # what the model reads
    shape = model_shape(model_dir)
    return {
        "queries": len(work),
        "pairs": len(lengths),
        "max_length": limit,
        "tokens": {
            "median": float(np.median(lengths)),
            "p90": float(np.percentile(lengths, 90)),
            "truncated": float((lengths > limit).mean()),
            "read_mean": float(read.mean()),
        },
        "model": shape,
        "flops_total": float(pair_flops(read, shape).sum()),
        "flops_first_request": float(pair_flops(read[: len(work[0][1])], shape).sum()),
        "flops_formula": "2 x matmul_params x L + 4 x L^2 x hidden x layers per pair of L read tokens",
        "requests": [{"query": q, "doc_ids": [d for d, _, _ in docs]} for q, docs in work],
    }


def _percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs)
    return {f"p{p}": float(np.percentile(a, p)) for p in (50, 95, 99)}


# ---- the baseline -----------------------------------------------------------------------------


def _baseline(
    model_dir: Path, work: list, per_request: bool, progress: Any = None
) -> tuple[float, list[float], list[np.ndarray]]:
    from sentence_transformers import CrossEncoder

    from sidecar.scoring._st import quiet_transformers

    quiet_transformers()  # no weight-loading bars between the progress lines
    model = CrossEncoder(str(model_dir), device="cpu")
    model.predict([("warm up", "the model")] * 4, batch_size=32, show_progress_bar=False)
    texts = _texts(work)
    latencies: list[float] = []
    task = (
        progress.add_task("baseline: CrossEncoder.predict per request", total=len(texts))
        if progress
        else None
    )
    started = time.perf_counter()
    if per_request:
        scores = []
        for pairs in texts:
            t0 = time.perf_counter()
            scores.append(model.predict(pairs, batch_size=32, show_progress_bar=False))
            latencies.append(time.perf_counter() - t0)
            if task is not None:
                progress.advance(task)
    else:
        flat = model.predict([p for pairs in texts for p in pairs], batch_size=32, show_progress_bar=False)
        scores, i = [], 0
        for pairs in texts:
            scores.append(flat[i : i + len(pairs)])
            i += len(pairs)
    return time.perf_counter() - started, latencies, scores


# ---- one configuration ------------------------------------------------------------------------


class Refused(Exception):
    """`serve` exited before serving; the message is its own reason."""


class Failed(Exception):
    """A configuration that served but could not be measured (a request failed); the message says how."""


def _rpc_failure(exc: Exception) -> str:
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"a request failed: {code().name}: {details()}"
    return f"a request failed: {exc}"


def _sidecar(
    model_dir: Path,
    work: list,
    serve_args: list[str],
    args: argparse.Namespace,
    progress: Any,
    label: str,
    log_path: Path,
) -> dict[str, Any]:
    """The served configuration under `concurrency` clients, then its lone request (concurrency 1)."""
    import grpc

    from sidecar.client import RerankerClient
    from sidecar.launch import SidecarProcess

    sc = SidecarProcess(["--model", str(model_dir), *serve_args], log_path=log_path)
    try:
        sc.start()
    except RuntimeError as exc:  # it exited before serving: its log says why
        raise Refused(refusal(log_path.read_text(errors="replace")) or str(exc)) from None
    try:
        with RerankerClient(sc.grpc_target) as client:
            info = client.info()
            try:
                client.rerank("warm up", ["the model"] * 2)
            except grpc.RpcError as exc:
                raise Failed(_rpc_failure(exc)) from None
            run = _load(client, work, args.concurrency, progress, label)
            if args.lone_repeats > 0:
                progress.console.print(
                    f"{label}: a lone request x{args.lone_repeats}, "
                    "alternated with its pure compute in-process",
                    highlight=False,
                )
                run["lone"], run["compute"] = _lone_and_compute(client, model_dir, serve_args, work[0], args)
    finally:
        sc.stop()
    run["info"] = {
        "runtime": getattr(info, "runtime", None) or "torch",
        "dtype": info.dtype,
        "device": info.device,
        "attention": info.attention,
        "cascade": getattr(info, "cascade", ""),
        "cascade_depth": getattr(info, "cascade_depth", 0),
    }
    return run


def _documents(docs: list) -> list[Any]:
    from sidecar.types import Document

    return [Document(text=x, id=d, title=t or None) for d, t, x in docs]


def _load(client: Any, work: list, concurrency: int, progress: Any, label: str) -> dict[str, Any]:
    import grpc

    lock = threading.Lock()
    todo = list(enumerate(work))
    latencies: list[float] = []
    queue_s: list[float] = []
    scores: dict[int, np.ndarray] = {}
    errors: list[grpc.RpcError] = []
    task = progress.add_task(f"{label}: {concurrency} concurrent clients", total=len(work))

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i, (q, docs) = todo.pop(0)
            t0 = time.perf_counter()
            try:
                result = client.rerank(q, _documents(docs), timeout=3600)
            except grpc.RpcError as exc:  # reported as this configuration's failure
                with lock:
                    errors.append(exc)
                    todo.clear()
                return
            elapsed = time.perf_counter() - t0
            s = np.empty(len(docs), dtype=np.float32)
            for h in result.hits:
                s[h.index] = h.score
            with lock:
                latencies.append(elapsed)
                queue_s.append(result.timings.queue_seconds)
                scores[i] = s
                progress.advance(task)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise Failed(_rpc_failure(errors[0]))
    return {
        "wall": wall,
        "latencies": latencies,
        "queue": queue_s,
        "scores": [scores[i] for i in range(len(work))],
    }


def _lone(client: Any, request: tuple[str, list]) -> float:
    """One request alone, past the score cache (it has scored these pairs already)."""
    q, docs = request
    t0 = time.perf_counter()
    client.rerank(q, _documents(docs), timeout=3600, bypass_cache=True)
    return time.perf_counter() - t0


def _serve_settings(model_dir: Path, serve_args: list[str]) -> Any:
    """The Settings `serve` builds from these flags (and the same environment)."""
    from sidecar.cli import _add_settings_flags, settings_from_args

    parser = argparse.ArgumentParser(prog="rerank-sidecar serve", exit_on_error=False)
    _add_settings_flags(parser)
    try:
        given, unknown = parser.parse_known_args(["--model", str(model_dir), *serve_args])
    except argparse.ArgumentError as exc:
        raise ValueError(f"serve {exc}") from None
    if unknown:
        raise ValueError(f"serve has no flag {' '.join(unknown)}")
    return settings_from_args(given)


def lone_batches(
    tokens: list[int], max_tokens: int, max_pairs: int, padding_free: bool = False
) -> list[list[int]]:
    """The batches the batcher forms for one request alone: longest first, each batch filled while its
    cost fits the token budget: (pairs + 1) x its longest pair, or the sum of real tokens for a scorer
    that packs without padding (sidecar/batcher.py `_fits`)."""
    order = sorted(range(len(tokens)), key=lambda i: -max(1, tokens[i]))
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        if batch and len(batch) < max_pairs:
            cost = (
                sum(max(1, tokens[j]) for j in batch) + max(1, tokens[i])
                if padding_free
                else (len(batch) + 1) * max(1, tokens[batch[0]])
            )
            if cost <= max_tokens:
                batch.append(i)
                continue
        batches.append([i])
    return batches


class PureCompute:
    """The lone request's pairs scored in-process by a scorer with the same settings, in the batches the
    batcher would form: what the model itself costs, with no server (measuring tokens is the server's
    tokenize threads' work and is not counted; where the scorer makes encodings, they are handed over
    as the batcher does)."""

    def __init__(self, model_dir: Path, serve_args: list[str], request: tuple[str, list]) -> None:
        from sidecar.scoring.base import Pair
        from sidecar.scoring.loading import load_scorer

        settings = _serve_settings(model_dir, serve_args)
        self.scorer = load_scorer(settings)
        q, docs = request
        pairs = [Pair(q, f"{t} {x}" if t else x) for _, t, x in docs]
        measures = self.scorer.measure(pairs)
        self.pairs = [m.clipped or p for p, m in zip(pairs, measures, strict=True)]
        encodings = [getattr(m, "encoding", None) for m in measures]
        self.encodings = encodings if all(e is not None for e in encodings) else None
        self.tokens = [m.tokens for m in measures]
        self.budget = (settings.max_batch_tokens, settings.max_batch_pairs)
        self.padding_free = bool(getattr(self.scorer, "padding_free", False))
        self.batches = lone_batches(self.tokens, *self.budget, padding_free=self.padding_free)
        self.run([list(range(min(4, len(self.pairs))))])  # warm-up, as the server's

    def run(self, batches: list[list[int]] | None = None) -> float:
        """Seconds to score the request; with a cascade, its first pass over every pair and then the top
        `cascade_depth` re-scored, each in the batches the batcher would form."""
        t0 = time.perf_counter()
        depth = self.scorer.cascade_depth
        if batches is None and depth and len(self.pairs) > depth:
            first = self._score(self.batches, first_pass=True)
            top = [int(i) for i in np.argsort(-first, kind="stable")[:depth]]
            tops = lone_batches([self.tokens[i] for i in top], *self.budget, padding_free=self.padding_free)
            self._score([[top[j] for j in b] for b in tops])
        else:
            self._score(self.batches if batches is None else batches)
        return time.perf_counter() - t0

    def _score(self, batches: list[list[int]], first_pass: bool = False) -> np.ndarray:
        scores = np.zeros(len(self.pairs), dtype=np.float32)
        flag = {"first_pass": True} if first_pass else {}
        for b in batches:
            batch = [self.pairs[i] for i in b]
            given = None if self.encodings is None else [self.encodings[i] for i in b]
            scores[b] = self.scorer.score(batch, given, **flag)
        return scores


def _lone_and_compute(
    client: Any, model_dir: Path, serve_args: list[str], request: tuple[str, list], args: argparse.Namespace
) -> tuple[list[float], list[float]]:
    """The lone request through the idle server and its pure compute in this process, alternated, so
    that a machine whose load drifts weighs on both alike."""
    with torch_threads(sidecar_threads()):
        compute = PureCompute(model_dir, serve_args, request)
        lone, pure = [], []
        for _ in range(args.lone_repeats):
            lone.append(_lone(client, request))
            pure.append(compute.run())
    del compute
    gc.collect()
    return lone, pure


def ranking_check(ours: list[np.ndarray], ref: list[np.ndarray]) -> dict[str, Any]:
    def top(a: np.ndarray, k: int | None = 10) -> list[int]:
        return [int(i) for i in np.argsort(-a, kind="stable")[:k]]

    pairs = list(zip(ours, ref, strict=True))
    return {
        "queries": len(ref),
        "top10_identical": sum(top(a) == top(b) for a, b in pairs),
        "top10_set_identical": sum(set(top(a)) == set(top(b)) for a, b in pairs),
        "full_ranking_identical": sum(top(a, None) == top(b, None) for a, b in pairs),
        "max_abs_score_diff": max(float(np.max(np.abs(a - b))) for a, b in pairs),
    }


_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d [\d:,.]+ [A-Z]+ [\w.]+: ")


def refusal(log: str) -> str | None:
    """Why a `serve` that exited before serving refused: its last error line, without the log prefix."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [
        ln
        for ln in lines
        if " ERROR " in ln or " CRITICAL " in ln or ln.startswith("invalid setting") or ln.startswith("error")
    ]
    picked = errors[-1] if errors else (lines[-1] if lines else None)
    return _LOG_PREFIX.sub("", picked) if picked else None


def _ceiling_for(dtype: str) -> str:
    """The matmul ceiling a served precision is held against: bf16 where the float part is bf16."""
    return "bfloat16" if "bfloat16" in dtype else "float32"


def _measure_config(
    config: Config,
    model_dir: Path,
    work: list,
    args: argparse.Namespace,
    progress: Any,
    report: dict[str, Any],
) -> dict[str, Any]:
    """Serve, load and time one configuration; every ratio comes from numbers in `report`."""
    serve_args = [*args.serve_arg, *config.serve_flags()]
    row: dict[str, Any] = {**asdict(config), "label": config.label, "serve_flags": serve_args}
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "serve.log"
        try:
            side = _sidecar(model_dir, work, serve_args, args, progress, config.label, log_path)
        except Refused as exc:
            return {**row, "status": "refused", "reason": str(exc)}
        except Failed as exc:
            return {**row, "status": "failed", "reason": str(exc)}
    base = report["baseline"]
    workload = report["workload"]
    ceiling = _ceiling_for(side["info"]["dtype"])
    gflops = workload["flops_total"] / side["wall"] / 1e9
    row.update(
        status="ok",
        info=side["info"],
        wall_s=side["wall"],
        pairs_per_s=workload["pairs"] / side["wall"],
        **_percentiles(side["latencies"]),
        queue_p50=statistics.median(side["queue"]),
        gflops=gflops,
        ceiling=ceiling,
        ceiling_share=gflops / report["ceilings"][ceiling]["gflops"],
        ranking=ranking_check(side["scores"], report["_baseline_scores"]),
    )
    row["ratio"] = row["pairs_per_s"] / base["pairs_per_s"]
    if args.lone_repeats > 0:
        compute = side["compute"]
        lone_p50, compute_p50 = statistics.median(side["lone"]), statistics.median(compute)
        row["lone"] = {
            "pairs": len(work[0][1]),
            "latencies_s": side["lone"],
            "p50_s": lone_p50,
            "pure_compute_s": compute,
            "pure_compute_p50_s": compute_p50,
            "pure_compute_gflops": workload["flops_first_request"] / compute_p50 / 1e9,
            "ratio": lone_p50 / compute_p50,
        }
    return row


# ---- the report -------------------------------------------------------------------------------


def _baseline_row(name: str, wall: float, latencies: list[float], report: dict[str, Any]) -> dict[str, Any]:
    gflops = report["workload"]["flops_total"] / wall / 1e9
    row = {
        "name": name,
        "wall_s": wall,
        "pairs_per_s": report["workload"]["pairs"] / wall,
        "gflops": gflops,
        "ceiling": "float32",
        "ceiling_share": gflops / report["ceilings"]["float32"]["gflops"],
    }
    return {**row, **_percentiles(latencies)} if latencies else row


def header_lines(report: dict[str, Any]) -> list[str]:
    hw, ceil, wl = report["hardware"], report["ceilings"], report["workload"]
    flags = " ".join(f for f, on in hw["flags"].items() if on) or "none of " + " ".join(CPU_FLAGS)
    versions = ", ".join(f"{k} {v}" for k, v in hw["versions"].items() if v)
    return [
        f"CPU: {hw['cpu_model']}, {hw['usable_cpus']} usable of {hw['logical_cpus']} logical CPUs, "
        f"model threads {hw['sidecar_threads']} (torch's default {hw['torch_threads']}); flags: {flags}",
        f"versions: {versions}",
        f"ceiling ({ceil['threads']} threads): float32 {ceil['float32']['gflops']:.0f} GFLOP/s "
        f"({ceil['float32']['size']}^2 matmul), bfloat16 {ceil['bfloat16']['gflops']:.1f} GFLOP/s "
        f"({ceil['bfloat16']['size']}^2, {ceil['bfloat16']['note']})",
        f"work: {wl['queries']} queries, {wl['pairs']} pairs, {report['concurrency']} concurrent clients; "
        f"lone request: the first query's {len(wl['requests'][0]['doc_ids'])} pairs, p50 of "
        f"{report['lone_repeats']}; tokens per pair median "
        f"{wl['tokens']['median']:.0f}, p90 {wl['tokens']['p90']:.0f}, truncated at {wl['max_length']}: "
        f"{wl['tokens']['truncated']:.1%}; {wl['flops_total'] / wl['pairs'] / 1e9:.3g} GFLOP per pair "
        f"on average ({wl['flops_formula']}; {wl['model']['matmul_params'] / 1e6:.2f} M matmul weights)",
    ]


COLUMNS = (
    "configuration",
    "served as",
    "pairs/s",
    "x baseline",
    "p50 s",
    "p95 s",
    "GFLOP/s",
    "% ceiling",
    "top-10 order",
    "top-10 set",
    "max |diff|",
    "lone p50 s",
    "compute s",
    "lone / compute",
)


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    base = report["baseline"]

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    rows = [
        [
            base["name"],
            "torch float32",
            num(base["pairs_per_s"], ".1f"),
            "1.00",
            num(base["p50"], ".2f"),
            num(base["p95"], ".2f"),
            num(base["gflops"], ".3g"),
            num(100 * base["ceiling_share"], ".0f"),
            *["-"] * 6,
        ]
    ]
    glob = report.get("global_baseline")
    if glob:
        rows.append(
            [glob["name"], "torch float32", num(glob["pairs_per_s"], ".1f"),
             num(glob["pairs_per_s"] / base["pairs_per_s"], ".2f"), "-", "-",
             num(glob["gflops"], ".3g"), num(100 * glob["ceiling_share"], ".0f"), *["-"] * 6]
        )  # fmt: skip
    for r in report["configs"]:
        if r["status"] != "ok":
            continue
        rank, lone = r["ranking"], r.get("lone") or {}
        n = rank["queries"]
        rows.append(
            [
                f"sidecar {r['label']}",
                f"{r['info']['runtime']} {r['info']['dtype']}"
                + (
                    f" after {r['info']['cascade']}@{r['info']['cascade_depth']}"
                    if r["info"].get("cascade")
                    else ""
                ),
                num(r["pairs_per_s"], ".1f"),
                num(r["ratio"], ".2f"),
                num(r["p50"], ".2f"),
                num(r["p95"], ".2f"),
                num(r["gflops"], ".3g"),
                f"{100 * r['ceiling_share']:.0f} ({r['ceiling']})",
                f"{rank['top10_identical']}/{n}",
                f"{rank['top10_set_identical']}/{n}",
                f"{rank['max_abs_score_diff']:.1e}",
                num(lone.get("p50_s"), ".2f"),
                num(lone.get("pure_compute_p50_s"), ".2f"),
                num(lone.get("ratio"), ".2f"),
            ]
        )
    return rows


# Issue 13's goals, checked here and never in timed tests: throughput against the baseline at concurrency 8,
# and a lone request's latency against its pure compute.
GOAL_RATIO = 3.0
GOAL_LONE = 1.2


def goal_lines(report: dict[str, Any]) -> list[str]:
    ran = [r for r in report["configs"] if r["status"] == "ok"]
    fast = [f"{r['label']} {r['ratio']:.2f}x" for r in ran if r["ratio"] >= GOAL_RATIO]
    lone = [r for r in ran if r.get("lone")]
    close = [f"{r['label']} {r['lone']['ratio']:.2f}" for r in lone if r["lone"]["ratio"] <= GOAL_LONE]
    return [
        f">= {GOAL_RATIO:.1f}x the baseline at concurrency {report['concurrency']}: "
        + (", ".join(fast) or "none")
        + " (quality: check nDCG@10 with the guard; agreement above)",
        f"lone request within {GOAL_LONE}x of its pure compute: "
        + (", ".join(close) or "none")
        + f" (of {len(lone)} measured)",
    ]


def skipped_lines(report: dict[str, Any]) -> list[str]:
    return [f"{r['label']}: {r['status']}: {r['reason']}" for r in report["configs"] if r["status"] != "ok"]


def markdown(report: dict[str, Any]) -> str:
    lines = [f"- {line}" for line in header_lines(report)]

    def cells(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

    lines += ["", cells(COLUMNS), cells(["---"] * len(COLUMNS))]
    lines += [cells(row) for row in table_rows(report)]
    lines += ["", "Goals:", *(f"- {g}" for g in goal_lines(report))]
    skipped = skipped_lines(report)
    if skipped:
        lines += ["", "Not run:", *(f"- {s}" for s in skipped)]
    return "\n".join(lines) + "\n"


def _print(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    for line in header_lines(report):
        console.print(line, highlight=False)
    table = Table(title="rerank throughput (same model, same pairs, same run)")
    for col in COLUMNS:
        table.add_column(col)
    for row in table_rows(report):
        table.add_row(*row)
    console.print(table)
    for line in goal_lines(report):
        console.print(f"goal: {line}", highlight=False)
    for line in skipped_lines(report):
        console.print(f"not run: {line}", highlight=False)


def _plan(
    configs: list[Config], model_dir: Path, args: argparse.Namespace
) -> list[tuple[Config, str | None]]:
    """Per configuration, why it cannot run here (None: it can), decided before anything is timed."""
    from sidecar.scoring.device import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    return [
        (c, unavailable(c, native) or refused_settings(c, model_dir, [*args.serve_arg, *c.serve_flags()]))
        for c in configs
    ]


def main(args: argparse.Namespace) -> int:
    import sys

    from rich.console import Console

    from sidecar.progress import progress_display

    console = Console()
    if not console.is_terminal:  # a log file: the whole table, not one wrapped to 80 columns
        console.width = 220
    try:
        configs = parse_matrix(args.matrix) if args.matrix else [Config(args.runtime, args.precision)]
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.matrix and (args.runtime or args.precision):
        print("--matrix names its own runtimes and precisions: drop --runtime / --precision", file=sys.stderr)
        return 2
    model_dir = _model_dir(args)
    plan = _plan(configs, model_dir, args)
    for config, reason in plan:
        if reason:
            console.print(f"{config.label}: skipped: {reason}", highlight=False)
    if not any(reason is None for _, reason in plan):
        print("nothing to benchmark on this machine (reasons above)", file=sys.stderr)
        return 1

    report: dict[str, Any] = {
        "hardware": hardware(),
        "concurrency": args.concurrency,
        "lone_repeats": args.lone_repeats,
    }
    console.print("measuring the matmul ceilings", highlight=False)
    report["ceilings"] = ceilings(report["hardware"]["native_bf16"])
    console.print("building BM25 top-k pairs", highlight=False)
    work = _pairs(args)
    report["workload"] = _workload(model_dir, work)
    for line in header_lines(report):
        console.print(line, highlight=False)

    with progress_display(console) as progress:
        base_wall, base_lat, base_scores = _baseline(model_dir, work, per_request=True, progress=progress)
        report["baseline"] = _baseline_row(BASELINE_NAME, base_wall, base_lat, report)
        report["_baseline_scores"] = base_scores
        if not args.skip_global_baseline:
            console.print("baseline: one CrossEncoder.predict over all pairs", highlight=False)
            glob_wall, _, _ = _baseline(model_dir, work, per_request=False)
            report["global_baseline"] = _baseline_row(
                "sentence-transformers predict, all pairs at once (fp32, bs 32)", glob_wall, [], report
            )
        report["configs"] = [
            _measure_config(config, model_dir, work, args, progress, report)
            if reason is None
            else {**asdict(config), "label": config.label, "status": "skipped", "reason": reason}
            for config, reason in plan
        ]
    del report["_baseline_scores"]

    report["table"] = {"columns": list(COLUMNS), "rows": table_rows(report)}
    report["goals"] = goal_lines(report)
    _print(console, report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    return 0
