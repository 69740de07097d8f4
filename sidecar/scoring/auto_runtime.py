"""What `--dtype auto` (and `--runtime auto`) load on a CPU: the fastest configuration the guard passed.

`choose` is pure: from a guard record (`sidecar/guard.py`) and what this machine offers (native bf16, the
runtimes that import) it picks the passed configuration with the most pairs/s. A configuration the guard
failed (it lost more than 0.005 nDCG@10 against torch float32) is never picked, however fast. Without a
usable record for the model it picks float32, which cannot lose quality, and says how to measure.

`resolve_settings` is the one call loading makes: it finds the record (the export cache, keyed by the
model's content hash, then a `guard.json` shipped in the model directory), applies `choose` and returns
the settings to load with and one line of reason for the start log. On CUDA, `auto` stays bfloat16
(float16 without bf16) and is not guarded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.scoring.loading import ModelSource
    from sidecar.settings import Settings

log = logging.getLogger(__name__)

THRESHOLD = 0.005  # nDCG@10 a configuration may lose against torch float32 (its mean change) and still pass
# ... and the loss that must be ruled out with one-sided 90% confidence (the guard's `delta_lower`, the mean
# change paired over queries minus 1.2816 standard errors): a precision that shuffles rankings can look
# harmless on a few dozen queries by chance (sidecar/guard.py).
BOUND_THRESHOLD = 0.010
RECORD_FORMAT = "rerank-sidecar-guard/1"
MODEL_DIR_RECORD = "guard.json"  # a record shipped inside a model directory
# The packaged all-MiniLM-L6-v2's record (its weights live in another package), beside its fusion.json.
PACKAGED_RECORD = Path(__file__).resolve().parents[1] / "data" / "all-minilm-l6-v2" / MODEL_DIR_RECORD
GUARD_HINT = (
    "run `rerank-sidecar guard --model M --split train` to measure which faster precisions keep rankings"
)


@dataclass(frozen=True)
class Offer:
    """What this machine can run: native bf16 matrix units, and the runtimes the scorer can load."""

    native_bf16: bool
    runtimes: frozenset[str]


@dataclass(frozen=True)
class Choice:
    runtime: str
    dtype: str
    quantize: str
    precision: str
    reason: str
    guarded: bool  # True when chosen from a passed guard measurement
    # A cascade's first pass (RUNTIME/PRECISION) and depth when the chosen row is a cascade; else none.
    cascade: str = "none"
    cascade_depth: int | None = None


def _precision(runtime: str, dtype: str, quantize: str) -> str:
    from sidecar.scoring.runtimes import precision_name

    return precision_name(runtime, dtype, quantize)


def record_problem(record: Mapping[str, Any], revision: str | None) -> str | None:
    """Why `record` cannot guide the choice for the model with content hash `revision`; None when it can."""
    if record.get("format") != RECORD_FORMAT:
        return f"unknown record format {record.get('format')!r}"
    model = record.get("model") or {}
    if revision is not None and model.get("revision") != revision:
        return f"measured on other weights ({model.get('revision')}, this model is {revision})"
    if (record.get("dataset") or {}).get("split") == "test":
        return "measured on a test split (a report, never a choice)"
    if not record.get("configs"):
        return "no configurations measured"
    return None


def passed(row: Mapping[str, Any]) -> bool:
    """The guard's verdict, re-judged from the recorded change (its lower confidence bound, in records that
    have one) so a hand-edited 'passed' cannot widen it."""
    delta = row.get("delta")
    bound = row.get("delta_lower", delta)
    return (
        bool(row.get("passed"))
        and isinstance(delta, (int, float))
        and isinstance(bound, (int, float))
        and delta >= -THRESHOLD
        and bound >= -BOUND_THRESHOLD
    )


def _fallback(runtime: str, quantize: str, why: str) -> Choice:
    if quantize != "none":
        # The user asked for int8: honoured, unguarded; the rest is what `auto` means for that runtime's
        # int8 (torch: float32 activations; OpenVINO: bf16 where native), as without a guard.
        return Choice(
            runtime,
            "auto",
            quantize,
            "int8-dynamic" if runtime == "torch" else "int8",
            f"{why}; int8 as asked (--quantize), not guarded",
            False,
        )
    return Choice(runtime, "float32", "none", "float32", f"{why}: float32, which cannot lose quality", False)


def choose(
    record: Mapping[str, Any] | None,
    offer: Offer,
    *,
    runtime: str = "auto",
    quantize: str = "none",
    cascade: str = "auto",
    fp32_runtime: str = "torch",
) -> Choice:
    """The fastest configuration `record` passed that `offer` can run.

    `runtime` other than 'auto' keeps the choice within that runtime; `quantize='int8'` within int8
    configurations (the user asked for int8: with none passed, it is still honoured, unguarded).
    Cascade rows (a first pass, then the top re-scored; `cascade` in the row) compete only when `cascade`
    is 'auto' and no int8 was asked for; their first pass must run here too.
    `fp32_runtime` is the runtime of the no-record fallback (torch, or one shown to match it in float32).
    """
    home = fp32_runtime if runtime == "auto" else runtime
    if record is None:
        return _fallback(home, quantize, "no quality-guard record for this model")
    candidates = []
    for row in record.get("configs") or []:
        rt, dtype, quant = row.get("runtime"), row.get("dtype"), row.get("quantize")
        if not passed(row) or rt not in offer.runtimes:
            continue
        if runtime != "auto" and rt != runtime:
            continue
        if quantize != "none" and quant != quantize:
            continue
        if dtype == "bfloat16" and not offer.native_bf16:
            continue
        if not isinstance(row.get("pairs_per_s"), (int, float)):
            continue
        first = row.get("cascade")
        if first is not None:
            if cascade != "auto" or quantize != "none" or not isinstance(first, Mapping):
                continue
            if first.get("runtime") not in offer.runtimes or not isinstance(first.get("depth"), int):
                continue
            if first.get("dtype") == "bfloat16" and not offer.native_bf16:
                continue
        candidates.append(row)
    if not candidates:
        return _fallback(home, quantize, "no configuration the guard passed is available here")
    best = max(candidates, key=lambda r: float(r["pairs_per_s"]))
    ds = record.get("dataset") or {}
    first = best.get("cascade")
    reason = (
        f"fastest configuration the quality guard passed{' (a cascade)' if first else ''}: nDCG@10 "
        f"{best['delta']:+.4f} against torch float32 on {ds.get('name')} {ds.get('split')} "
        f"({ds.get('queries')} queries x top-{ds.get('depth')})"
    )
    return Choice(
        str(best["runtime"]),
        str(best["dtype"]),
        str(best["quantize"]),
        _precision(str(best["runtime"]), str(best["dtype"]), str(best["quantize"])),
        reason,
        True,
        cascade=f"{first['runtime']}/{first['precision']}" if first else "none",
        cascade_depth=int(first["depth"]) if first else None,
    )


# ---- the impure part: where records live, what this machine offers ---------------------------------------


def runtimes_available() -> set[str]:
    """Runtimes this installation can load: torch always; OpenVINO and ONNX Runtime when their packages
    (the [cpu] extra) import."""
    import importlib.util

    from sidecar.scoring.runtimes import _MODULES

    out = {"torch"}
    for runtime, modules in _MODULES.items():
        if all(importlib.util.find_spec(m) is not None for m in modules):
            out.add(runtime)
    return out


def default_export_cache_dir() -> Path:
    """The settings' export cache ($RERANK_EXPORT_CACHE_DIR, else its default)."""
    from sidecar.settings import Settings

    return Path(Settings().export_cache_dir).expanduser()  # type: ignore[call-arg]


def record_path(export_cache_dir: Path, revision: str) -> Path:
    """Where the guard record of the model with content hash `revision` is kept."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in revision)
    return Path(export_cache_dir).expanduser() / "guard" / f"{safe}.json"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_record(settings: Settings, source: ModelSource) -> tuple[dict[str, Any] | None, str]:
    """The guard record for `source` (export cache first, then the model directory) and where it came from;
    (None, why not) when there is none that fits this model."""
    from sidecar.scoring.runtimes import model_content_id

    revision = model_content_id(source)
    places = [record_path(Path(settings.export_cache_dir), revision)]
    if source.local:
        places.append(Path(source.path_or_id) / MODEL_DIR_RECORD)
        from sidecar.model_factory import packaged_embedding_model_dir

        if Path(source.path_or_id).resolve() == packaged_embedding_model_dir().resolve():
            places.append(PACKAGED_RECORD)
    problems = []
    for place in places:
        if not place.is_file():
            continue
        record = _read(place)
        problem = "not a JSON object" if record is None else record_problem(record, revision)
        if problem is None:
            return record, str(place)
        problems.append(f"{place}: {problem}")
    return None, "; ".join(problems) or "no quality-guard record for this model"


def this_machine() -> Offer:
    from sidecar.scoring.device import cpu_has_native_bf16

    return Offer(native_bf16=cpu_has_native_bf16(), runtimes=frozenset(runtimes_available()))


def _on_cuda(device: str) -> bool:
    if device == "auto":
        import torch

        return bool(torch.cuda.is_available())
    return device.startswith("cuda")


def resolve_settings(settings: Settings, source: ModelSource) -> tuple[Settings, str]:
    """The settings to load with (runtime, dtype and quantize made concrete on a CPU) and why, in one line.

    An explicit `--dtype` is never second-guessed (`--runtime auto` is then torch); on CUDA `auto` stays
    bf16 and is not guarded. Otherwise the guard record decides, within an explicit `--runtime` or
    `--quantize int8` when one is given.
    """
    runtime = settings.runtime
    if settings.dtype != "auto" or _on_cuda(settings.device):
        if runtime == "auto":
            settings = settings.model_copy(update={"runtime": "torch"})
        if settings.cascade == "auto":
            settings = settings.model_copy(update={"cascade": "none"})
        if settings.dtype != "auto":
            return settings, f"{settings.runtime} with --dtype {settings.dtype} as configured"
        return settings, "CUDA: --dtype auto is bfloat16 (float16 without bf16); not guarded"
    record, where = find_record(settings, source)
    choice = choose(
        record, this_machine(), runtime=runtime, quantize=settings.quantize, cascade=settings.cascade
    )
    update: dict[str, Any] = {"runtime": choice.runtime, "dtype": choice.dtype, "quantize": choice.quantize}
    if settings.cascade == "auto":
        update["cascade"] = choice.cascade
        if choice.cascade_depth is not None and "cascade_depth" not in settings.model_fields_set:
            update["cascade_depth"] = choice.cascade_depth
    reason = f"{choice.runtime}/{choice.precision}: {choice.reason}"
    if choice.cascade != "none":
        reason = f"cascade {choice.cascade} then top {choice.cascade_depth} at " + reason
    if record is not None:
        reason += f" (record {where})"
    elif choice.quantize == "none":
        if where != "no quality-guard record for this model":
            reason += f" ({where})"
        reason += f"; {GUARD_HINT}"
    return settings.model_copy(update=update), reason
