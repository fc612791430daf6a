"""Device and dtype, chosen once at the entry point (CLI flags, a Pipeline's constructor, a
training config) and handed down; nothing below picks its own.

Defaults probe the machine rather than assume it: float32 on a CPU (bfloat16 matmul is about 100x
slower than float32 on an AVX2-only CPU, and faster only where AVX512_BF16 / AMX exist), bfloat16 on
a GPU that supports it.
"""

from __future__ import annotations

import functools
import itertools
import warnings

import torch

from omnifuse.config import ConfigError, LoudDefaultWarning

__all__ = ["CPU_FEATURES", "DEVICES", "DTYPES", "choose_device", "choose_dtype", "cpu_features", "cpu_has_fast_bfloat16",
           "cpu_model"]

DEVICES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# The CPU features that decide which kernels and dtypes are fast here (Linux /proc/cpuinfo names).
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


@functools.cache
def _first_cpu() -> str:
    """This machine's /proc/cpuinfo block of its first processor (every core repeats it), read once."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(itertools.takewhile(str.strip, f))
    except OSError:  # not Linux: no flags known
        return ""


def _cpuinfo(text: str | None) -> str:
    return _first_cpu() if text is None else text


def cpu_features(cpuinfo: str | None = None) -> tuple[str, ...]:
    """Which of ``CPU_FEATURES`` this CPU has (``cpuinfo``: the text of /proc/cpuinfo; default:
    this machine's), in ``CPU_FEATURES`` order."""
    line = next((ln for ln in _cpuinfo(cpuinfo).splitlines() if ln.startswith(("flags", "Features"))), "")
    flags = set(line.partition(":")[2].split())
    return tuple(f for f in CPU_FEATURES if f in flags)


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (x86 ``model name``; else the platform's processor or machine)."""
    import platform

    for line in _cpuinfo(cpuinfo).splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512_BF16 or AMX), from /proc/cpuinfo."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_features()))


def choose_device(name: str | None = None) -> torch.device:
    """``cpu`` or ``cuda``; None picks cuda when a GPU is present, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but torch sees no CUDA GPU on this machine "
                          "(this torch build may be CPU-only); use --device cpu")
    return torch.device(name)


def choose_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """float32 on a CPU and bfloat16 on a GPU unless asked otherwise. float16 on a CPU is
    refused (few CPU kernels); bfloat16 on a CPU without native support runs, with a warning."""
    if name is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if device.type == "cpu" and name == "float16":
        raise ConfigError("dtype float16 is not supported on the CPU; use float32 (or bfloat16)")
    if device.type == "cpu" and name == "bfloat16" and not cpu_has_fast_bfloat16():
        warnings.warn("this CPU has no native bfloat16 (no AVX512_BF16 or AMX): bfloat16 matmuls run "
                      "far slower than float32 here", LoudDefaultWarning, stacklevel=2)
    return DTYPES[name]
