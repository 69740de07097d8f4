"""Chooses device, precision and attention kernel from settings and what the hardware offers."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_native_bf16() -> bool:
    """True on CPUs whose matrix units compute in bf16 (AMX or AVX512-BF16).

    Elsewhere PyTorch emulates bf16 and it is far slower than float32 (measured here on an AVX2-only
    EPYC: 0.3 GFLOP/s bf16 against 130 GFLOP/s fp32), so 'auto' must not pick it.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in _BF16_CPU_FLAGS)


@dataclass(frozen=True)
class Placement:
    device: str
    dtype: str
    attention: str

    def torch_dtype(self):  # type: ignore[no-untyped-def]
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]


def auto_dtype(on_cuda: bool, quantize: str = "none", cuda_bf16: bool = False) -> str:
    """What `--dtype auto` means: the fastest precision this hardware computes natively.

    bf16 on CUDA (fp16 on GPUs without bf16) and on CPUs with AMX / AVX512-BF16; float32 elsewhere.
    `--quantize int8` keeps float32 activations (dynamic int8 needs them), so with it 'auto' is float32
    on every CPU: the documented int8 command works whatever the CPU offers.
    """
    if on_cuda:
        return "bfloat16" if cuda_bf16 else "float16"
    if quantize != "none":
        return "float32"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def resolve(device: str, dtype: str, attention: str, quantize: str = "none") -> Placement:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but PyTorch sees no CUDA device; use --device cpu")
    on_cuda = device.startswith("cuda")
    if dtype == "auto":
        dtype = auto_dtype(on_cuda, quantize, on_cuda and torch.cuda.is_bf16_supported())
    if dtype == "bfloat16" and not on_cuda and not cpu_has_native_bf16():
        log.warning("bfloat16 on a CPU without AMX/AVX512-BF16 is emulated and much slower than float32")
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if attention == "auto":
        attention = "flash_attention_2" if (on_cuda and has_flash and dtype != "float32") else "sdpa"
    if attention == "flash_attention_2" and not (on_cuda and has_flash):
        raise ValueError(
            "--attention flash_attention_2 needs CUDA and the flash-attn package (the [gpu] extra)"
        )
    return Placement(device=device, dtype=dtype, attention=attention)
