"""Score fusion: how a reranker score and a first-stage score combine into the score that ranks a hit.

Owns every piece of fusion arithmetic (pure Python, no torch) and the `fusion.json` file a model directory
may carry. The service calls `fuse` once per request; front ends only translate `FusionSpec` to and from
their wire formats. The formulas are spelled out in docs/fusion.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.errors import InvalidInput, InvalidSchema, json_type_name

if TYPE_CHECKING:
    from sidecar.settings import Settings

FUSION_FILE = "fusion.json"


class FusionMethod(Enum):
    NONE = "none"  # rank by the reranker score alone
    BLEND = "blend"  # alpha * norm(reranker) + (1 - alpha) * norm(first stage)
    RRF = "rrf"  # reciprocal-rank fusion of the two rankings
    # ERank's hybrid (arXiv 2509.00520): alpha * z(first stage) + (1 - alpha) * z(reranker), population std.
    # Note alpha weighs the FIRST stage here, as in the paper, where blend's alpha weighs the reranker.
    ERANK_HYBRID = "erank_hybrid"

    @property
    def needs_first_stage_scores(self) -> bool:
        return self in (FusionMethod.BLEND, FusionMethod.ERANK_HYBRID)


class Normalization(Enum):
    MINMAX = "minmax"  # (x - min) / (max - min) over one request's documents
    ZSCORE = "zscore"  # (x - mean) / population std over one request's documents


def _names(enum: type[Enum]) -> str:
    return ", ".join(repr(m.value) for m in enum)


def _member(enum: type[Enum], value: Any, what: str) -> Any:
    if isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        raise InvalidInput(f"{what} {value!r} is unknown: use one of {_names(enum)}") from None


def _enum(enum: type[Enum], value: Any, where: str) -> Any:
    if not isinstance(value, str):
        raise InvalidSchema(f"`{where}` must be a string, got {json_type_name(value)}")
    try:
        return enum(value)
    except ValueError:
        raise InvalidSchema(f"`{where}` is {value!r}: use one of {_names(enum)}") from None


_KEYS = ("method", "alpha", "normalization", "rrf_k")


@dataclass(frozen=True)
class FusionSpec:
    """One fusion choice. `alpha` and `normalization` matter for BLEND, `alpha` alone for ERANK_HYBRID
    (where it is the first stage's weight), `rrf_k` for RRF only."""

    method: FusionMethod
    alpha: float = 0.5
    normalization: Normalization = Normalization.MINMAX
    rrf_k: int = 60

    def __post_init__(self) -> None:
        # Names are accepted too: FusionSpec("blend", normalization="zscore").
        object.__setattr__(self, "method", _member(FusionMethod, self.method, "fusion method"))
        object.__setattr__(
            self, "normalization", _member(Normalization, self.normalization, "fusion normalization")
        )
        try:
            alpha = float(self.alpha)
        except (TypeError, ValueError, OverflowError):
            alpha = math.nan
        if not 0 <= alpha <= 1:  # NaN fails too
            raise InvalidInput(
                f"fusion alpha={self.alpha!r} is out of range: use a number from 0 (first-stage order) "
                "to 1 (reranker order)"
            )
        if isinstance(self.rrf_k, bool) or not isinstance(self.rrf_k, int) or self.rrf_k < 1:
            raise InvalidInput(
                f"fusion rrf_k={self.rrf_k!r} is out of range: use an integer >= 1 (60 is usual)"
            )
        object.__setattr__(self, "alpha", alpha)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with only the parameters the method uses: {"method": "rrf", "rrf_k": 60}."""
        d: dict[str, Any] = {"method": self.method.value}
        if self.method is FusionMethod.BLEND:
            d["alpha"] = self.alpha
            d["normalization"] = self.normalization.value
        elif self.method is FusionMethod.RRF:
            d["rrf_k"] = self.rrf_k
        elif self.method is FusionMethod.ERANK_HYBRID:
            d["alpha"] = self.alpha
        return d

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], *, where: str = "fusion", strict: bool = True) -> FusionSpec:
        """The inverse of `to_dict`; absent parameters take their defaults.

        Wrong types and unknown names raise InvalidSchema, out-of-range values InvalidInput. `strict`
        refuses unknown keys (a typo in a request); `fusion.json` files carry extra keys and pass False.
        """
        if not isinstance(obj, Mapping):
            raise InvalidSchema(f"`{where}` must be an object or a method name, got {json_type_name(obj)}")
        if strict:
            unknown = sorted(set(obj) - set(_KEYS))
            if unknown:
                raise InvalidSchema(f"`{where}` has unknown key {unknown[0]!r}: use {', '.join(_KEYS)}")
        if "method" not in obj:
            raise InvalidSchema(f"`{where}.method` is missing: use one of {_names(FusionMethod)}")
        kwargs: dict[str, Any] = {"method": _enum(FusionMethod, obj["method"], f"{where}.method")}
        if obj.get("normalization") is not None:
            kwargs["normalization"] = _enum(Normalization, obj["normalization"], f"{where}.normalization")
        alpha = obj.get("alpha")
        if alpha is not None:
            if isinstance(alpha, bool) or not isinstance(alpha, int | float):
                raise InvalidSchema(f"`{where}.alpha` must be a number, got {json_type_name(alpha)}")
            kwargs["alpha"] = alpha
        rrf_k = obj.get("rrf_k")
        if rrf_k is not None:
            if isinstance(rrf_k, bool) or not isinstance(rrf_k, int):
                raise InvalidSchema(f"`{where}.rrf_k` must be an integer, got {json_type_name(rrf_k)}")
            kwargs["rrf_k"] = rrf_k
        return cls(**kwargs)

    @classmethod
    def parse(cls, value: Any, *, where: str = "fusion") -> FusionSpec:
        """A request's `fusion`: a method name ("rrf") or an object (see `from_dict`)."""
        if isinstance(value, str):
            return cls(_enum(FusionMethod, value, where))
        return cls.from_dict(value, where=where)

    def describe(self) -> str:
        """One line for logs: 'none', 'blend(alpha=0.3, minmax)', 'rrf(k=60)'."""
        if self.method is FusionMethod.BLEND:
            return f"blend(alpha={self.alpha:g}, {self.normalization.value})"
        if self.method is FusionMethod.RRF:
            return f"rrf(k={self.rrf_k})"
        if self.method is FusionMethod.ERANK_HYBRID:
            return f"erank_hybrid(alpha={self.alpha:g})"
        return "none"


NO_FUSION = FusionSpec(FusionMethod.NONE)


# ---- arithmetic -------------------------------------------------------------------------------
def first_missing(first_stage_scores: Sequence[float | None]) -> int | None:
    """Index of the first document without a first-stage score, or None when every one has it."""
    return next((i for i, s in enumerate(first_stage_scores) if s is None), None)


def check_inputs(spec: FusionSpec, first_stage_scores: Sequence[float | None]) -> None:
    """InvalidInput when `spec` cannot be applied to these documents (blend and erank_hybrid need every
    first-stage score)."""
    if spec.method.needs_first_stage_scores:
        i = first_missing(first_stage_scores)
        if i is not None:
            raise InvalidInput(
                f"fusion '{spec.method.value}' needs first_stage_score on every document; documents[{i}] has "
                "none: send scores or use rrf"
            )


def fuse(
    spec: FusionSpec, rerank_scores: Sequence[float], first_stage_scores: Sequence[float | None]
) -> list[float]:
    """The ranking score of each document (input order); higher ranks first.

    Normalisation and ranks are computed over this request's documents only: scores from different
    requests (queries) are not comparable after fusion.
    """
    if len(rerank_scores) != len(first_stage_scores):
        raise ValueError(f"{len(rerank_scores)} reranker scores for {len(first_stage_scores)} documents")
    check_inputs(spec, first_stage_scores)
    rerank = [float(x) for x in rerank_scores]
    if spec.method is FusionMethod.NONE:
        return rerank
    if spec.method is FusionMethod.BLEND:
        first = [float(x) for x in first_stage_scores if x is not None]
        a = spec.alpha
        return [
            a * r + (1 - a) * f
            for r, f in zip(
                normalize(rerank, spec.normalization), normalize(first, spec.normalization), strict=True
            )
        ]
    if spec.method is FusionMethod.ERANK_HYBRID:
        return erank_hybrid(rerank, [float(x) for x in first_stage_scores if x is not None], spec.alpha)
    k = spec.rrf_k
    rerank_rank = ranks(rerank)
    if first_missing(first_stage_scores) is None:
        first_rank = ranks([float(x) for x in first_stage_scores if x is not None])
    else:
        # No (or partial) first-stage scores: documents arrive in first-stage rank order.
        first_rank = list(range(1, len(rerank) + 1))
    return [1 / (k + r) + 1 / (k + f) for r, f in zip(rerank_rank, first_rank, strict=True)]


def erank_hybrid(rank_scores: Sequence[float], first_stage: Sequence[float], alpha: float) -> list[float]:
    """ERank's hybrid score: alpha * z(first stage) + (1 - alpha) * z(rank score), z over this request's
    documents with the population std (the model card's examples/utils.py uses numpy's default std).
    A constant column contributes 0 (the card's code would divide by zero)."""
    z_first = normalize(first_stage, Normalization.ZSCORE)
    z_rank = normalize(rank_scores, Normalization.ZSCORE)
    return [alpha * f + (1 - alpha) * r for f, r in zip(z_first, z_rank, strict=True)]


def normalize(values: Sequence[float], how: Normalization) -> list[float]:
    """Per-request normalisation. Constant input (including one document) maps to 0.0 everywhere."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    if lo == hi:
        # Tested on the values, not on a computed std, which rounding can leave at 1e-17 instead of 0.
        return [0.0] * len(values)
    if how is Normalization.MINMAX:
        return [(x - lo) / (hi - lo) for x in values]
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in values) / len(values))
    return [(x - mean) / std for x in values]


def ranks(scores: Sequence[float]) -> list[int]:
    """1-based rank of each score, highest first; ties keep input order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    out = [0] * len(scores)
    for rank, i in enumerate(order, 1):
        out[i] = rank
    return out


# ---- configuration ----------------------------------------------------------------------------
# Fusion weights shipped for the packaged all-MiniLM-L6-v2 (served when --model is unset).
PACKAGED_FUSION_DIR = Path(__file__).resolve().parent / "data" / "all-minilm-l6-v2"


def load_model_fusion(model_dir: str | Path) -> FusionSpec | None:
    """The `fusion.json` of a model directory (written by fusion tuning), or None when it has none.

    Format: {"method": "blend", "alpha": 0.3, "normalization": "minmax", "rrf_k": 60, ...}; other keys
    (where it was chosen, the dev figure) are ignored. A malformed file raises ValueError naming it.
    """
    path = Path(model_dir) / FUSION_FILE
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}): fix or delete it") from exc
    try:
        return FusionSpec.from_dict(obj, where=FUSION_FILE, strict=False)
    except InvalidInput as exc:  # InvalidSchema included
        raise ValueError(f"{path}: {exc.message}; fix or delete it, or set RERANK_FUSION") from exc


def configured_default(settings: Settings, model_dir: Path | None) -> tuple[FusionSpec, str]:
    """The server's default fusion and where it came from (for the start-up log).

    `model_dir` is the served model's local directory (None for a hub id); with `fusion=auto` its
    `fusion.json` decides, and no file means no fusion.
    """
    if settings.fusion != "auto":
        configured = FusionSpec(
            FusionMethod(settings.fusion),
            alpha=settings.fusion_alpha,
            normalization=Normalization(settings.fusion_normalization),
            rrf_k=settings.fusion_rrf_k,
        )
        return configured, f"RERANK_FUSION={settings.fusion}"
    if settings.model is None:
        # The packaged model ships weights chosen on SciFact's train split (`tune-fusion`, 809 queries).
        return load_model_fusion(PACKAGED_FUSION_DIR) or NO_FUSION, (
            f"RERANK_FUSION=auto: the packaged model's {PACKAGED_FUSION_DIR / FUSION_FILE} "
            "(chosen by tune-fusion on SciFact train queries)"
        )
    if model_dir is None:
        return NO_FUSION, "RERANK_FUSION=auto and the model is not a local directory"
    from_file = load_model_fusion(model_dir)
    if from_file is None:
        return NO_FUSION, f"RERANK_FUSION=auto and {model_dir} has no {FUSION_FILE}"
    return from_file, f"RERANK_FUSION=auto: {model_dir / FUSION_FILE}"
