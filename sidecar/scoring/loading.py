"""Resolves `--model` to something loadable, detects the scorer family and builds the scorer.

Nothing is downloaded unless the user named a hub id: the default is the packaged all-MiniLM-L6-v2 and
local directories load with `local_files_only`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from sidecar.model_factory import PACKAGED_MODEL_NAME, packaged_embedding_model_dir
from sidecar.scoring.auto_runtime import MODEL_DIR_RECORD, resolve_settings
from sidecar.scoring.base import Scorer
from sidecar.scoring.runtimes import placement_for, resolve_runtime
from sidecar.settings import Settings
from sidecar.threads import configure_cpu_threads

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class ModelSource:
    path_or_id: str
    model_id: str  # what Info reports
    revision: str
    local: bool


def local_model_dir(model: str | None) -> Path | None:
    """The local directory `--model` names (the packaged model's when unset); None for a hub id."""
    if model is None:
        return packaged_embedding_model_dir()
    path = Path(model).expanduser()
    return path.resolve() if path.is_dir() else None


def resolve_source(model: str | None, revision: str | None) -> ModelSource:
    path = local_model_dir(model)
    if path is not None:
        name = f"{PACKAGED_MODEL_NAME} (packaged)" if model is None else str(path)
        return ModelSource(str(path), name, _content_revision(path), True)
    assert model is not None
    if Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        raise ValueError(f"--model {model!r} is not a model directory (expected config.json inside)")
    # A hub id: the one case where we may download.
    return ModelSource(model, model, revision or "main", False)


def _content_revision(path: Path) -> str:
    """A short content hash of the weights and configs, so Info names exactly what is serving."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.name == MODEL_DIR_RECORD:
            continue  # the guard's record describes the weights; it must not change their hash
        if f.is_file() and (f.suffix in _WEIGHT_SUFFIXES or f.suffix == ".json"):
            h.update(str(f.relative_to(path)).encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return "sha256:" + h.hexdigest()[:12]


def detect_backend(source: ModelSource) -> str:
    """'cross-encoder', 'bi-encoder' or 'causal-lm', from the model's own configuration files.

    A sentence-transformers CrossEncoder config wins (its own modules, e.g. a causal LM with a LogitScore
    head, are then the reference); a bare *ForCausalLM checkpoint is an LLM reranker.
    """
    st_cfg = _read_config(source, "config_sentence_transformers.json")
    if st_cfg.get("model_type") == "CrossEncoder":
        return "cross-encoder"
    if st_cfg.get("model_type") == "SentenceTransformer" or _read_config(source, "modules.json"):
        return "bi-encoder"
    archs = _read_config(source, "config.json").get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "cross-encoder"
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal-lm"
    return "bi-encoder"


def detect_llm_family(source: ModelSource, settings: Settings) -> str:
    """The causal-LM family: --llm-family, else what the model's name announces; refuses to guess."""
    from sidecar.scoring.prompts import FAMILIES, guess_family

    if settings.llm_family != "auto":
        return settings.llm_family
    family = guess_family(source.path_or_id)
    if family is None:
        raise ModelLoadError(
            f"{source.model_id} is a causal language model, but its name does not say which reranker prompt "
            f"it was trained with: pass --llm-family ({', '.join(FAMILIES)})"
        )
    return family


def _read_config(source: ModelSource, name: str) -> dict:
    if source.local:
        f = Path(source.path_or_id) / name
        if not f.exists():
            return {}
        data = json.loads(f.read_text())
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError

        try:
            data = json.loads(
                Path(hf_hub_download(source.path_or_id, name, revision=source.revision)).read_text()
            )
        except EntryNotFoundError:
            return {}
    return data if isinstance(data, dict) else {"_list": data}


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what to do."""


_HUB_PROBE_SECONDS = 5.0


def _unreachable(model: str) -> ModelLoadError:
    return ModelLoadError(
        f"--model {model!r} is not a local directory, and the Hugging Face hub cannot be reached (or "
        "HF_HUB_OFFLINE is set): download the model where the hub is reachable (e.g. `hf download ID "
        "--local-dir DIR`) and pass --model DIR"
    )


def check_hub_id(source: ModelSource) -> None:
    """Fail within seconds, with a clear message, for a hub id that cannot load.

    Without this, a typo (`--model my-reranker`) or an offline machine sends the loaders into their retry
    loops for minutes before any error. A model already in the local Hugging Face cache passes untouched
    (it loads offline); otherwise the hub is asked once, with a short timeout and no retries.
    """
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    model = source.path_or_id
    try:
        cached = try_to_load_from_cache(model, "config.json", revision=source.revision)
    except HFValidationError:
        raise ModelLoadError(
            f"--model {model!r} is neither a local directory nor a valid hub id (OWNER/NAME)"
        ) from None
    if isinstance(cached, str):
        return
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise _unreachable(model)
    try:
        model_info(model, revision=source.revision, timeout=_HUB_PROBE_SECONDS)
    except RevisionNotFoundError:
        raise ModelLoadError(f"--model {model!r}: the hub has no revision {source.revision!r}") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"--model {model!r} is not a local directory and the hub has no such model (or it is private: "
            "log in with `hf auth login`); check the spelling, or pass the path of a model directory"
        ) from None
    except Exception as exc:
        if type(exc).__name__ in ("HfHubHTTPError", "HTTPStatusError") and "401" not in str(exc):
            raise ModelLoadError(f"--model {model!r}: the hub refused it ({exc})") from None
        raise _unreachable(model) from None


def load_scorer(settings: Settings) -> Scorer:
    source = resolve_source(settings.model, settings.revision)
    if not source.local:
        check_hub_id(source)
    try:
        return _load(source, settings)
    except ModelLoadError:
        raise
    except Exception as exc:
        if not source.local and _is_hub_unreachable(exc):
            raise _unreachable(source.path_or_id) from exc
        raise


def _is_hub_unreachable(exc: BaseException) -> bool:
    names = {
        "OfflineModeIsEnabled",
        "LocalEntryNotFoundError",
        "ConnectionError",
        "ConnectError",
        "HFValidationError",
    }
    while exc is not None:
        if type(exc).__name__ in names or "offline" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _load(source: ModelSource, settings: Settings) -> Scorer:
    backend = settings.backend if settings.backend != "auto" else detect_backend(source)
    if backend != "causal-lm":
        # `--dtype auto` / `--runtime auto` on a CPU: what the quality guard allows (sidecar/guard.py).
        settings, why = resolve_settings(settings, source)
        log.info("precision: %s", why)
    settings = resolve_runtime(settings, source)
    if backend == "causal-lm" and settings.runtime != "torch":
        raise ModelLoadError(
            f"--runtime {settings.runtime} cannot run causal-LM rerankers ({source.model_id}): "
            "use --runtime torch"
        )
    placement = placement_for(settings)
    configure_cpu_threads(placement.device)
    log.info(
        "loading %s as %s on %s (runtime %s, %s, %s)",
        source.model_id,
        backend,
        placement.device,
        settings.runtime,
        placement.dtype,
        placement.attention,
    )
    if backend == "causal-lm":
        from sidecar.scoring.causal_lm import CausalLMScorer

        return CausalLMScorer(source, placement, settings, detect_llm_family(source, settings))
    if backend == "cross-encoder":
        from sidecar.scoring.cross_encoder import CrossEncoderScorer

        return CrossEncoderScorer(source, placement, settings)
    from sidecar.scoring.bi_encoder import BiEncoderScorer

    return BiEncoderScorer(source, placement, settings)
