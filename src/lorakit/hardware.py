"""What this machine's CPU multiplies natively, and the dtype 16-bit adapted layers compute in.

A 16-bit GEMM on a CPU is fast only where the CPU has bf16 / fp16 dot-product or matrix units
(x86 ``avx512_bf16`` / ``amx_bf16``, ``avx512_fp16`` / ``amx_fp16``; ARM ``bf16``). Without them
PyTorch runs bf16 GEMMs several times slower than fp32, with them several times faster, so the
compute dtype of a 16-bit layer on CPU is decided here, once per process, from the CPU's flags:

- ``"auto"`` (default): native 16-bit where the CPU has units for that dtype and PyTorch can route
  16-bit GEMMs to oneDNN (``torch.backends.mkldnn.is_available()``); float32 otherwise, and
  float32 where the flags cannot be read (no ``/proc/cpuinfo``, e.g. macOS or Windows).
- ``"float32"``: always upcast 16-bit inputs to float32 (transient copies, nothing extra kept).
- ``"native"``: always compute in the 16-bit dtype itself.

Override with ``LORAKIT_CPU_COMPUTE=auto|float32|native`` (read once, at the first decision) or
:func:`set_cpu_compute` (takes precedence, any time).

Why flags and not a timing: a flag read costs nothing, gives the same answer in every process on
the machine (so the numerics of a run, and of its resume, do not depend on how busy the machine was
when a micro-benchmark ran) and works under fake tensors and tracing, where nothing can be timed.
Where the flags are silent the default is float32 because the two mistakes are not alike: fp32 on
a CPU with bf16 units costs ~2.5x on the GEMMs, bf16 on one without costs ~10x.
``torch.backends.cpu.get_cpu_capability()`` is reported by :func:`describe` as a hint only: it
says which ATen vector kernels run (``AVX512`` also on CPUs without bf16 units), not how oneDNN
multiplies 16-bit matrices.

No lorakit imports: everything else may import this module.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import torch

ENV = "LORAKIT_CPU_COMPUTE"
POLICIES = ("auto", "float32", "native")
Policy = Literal["auto", "float32", "native"]

# CPU flags (x86 "flags", ARM "Features" in /proc/cpuinfo) meaning a dtype has dot-product or
# matrix units with fp32 accumulation. ARM's fp16 arithmetic (asimdhp) is left out: it is SIMD
# arithmetic accumulating in fp16, not a dot-product unit.
UNITS: dict[torch.dtype, frozenset[str]] = {
    torch.bfloat16: frozenset({"avx512_bf16", "amx_bf16", "bf16", "svebf16"}),
    torch.float16: frozenset({"avx512_fp16", "amx_fp16"}),
}
# What describe() lists: the unit flags plus the ones that tell CPU generations apart.
SHOWN = ("avx2", "avx512f", "amx_tile", *sorted(set().union(*UNITS.values())))

_override: Policy | None = None


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    for line in _read_cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else the platform's processor string)."""
    import platform

    for line in _read_cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model name", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def has_units(dtype: torch.dtype) -> bool:
    """Whether the CPU has native units for 16-bit ``dtype`` GEMMs (from its flags)."""
    return bool(UNITS.get(dtype, frozenset()) & cpu_flags())


def policy() -> Policy:
    """The active policy: :func:`set_cpu_compute`'s, else ``$LORAKIT_CPU_COMPUTE``, else auto."""
    if _override is not None:
        return _override
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in POLICIES:
        raise ValueError(f"{ENV} must be one of {', '.join(POLICIES)}, got {value!r}")
    return value  # type: ignore[return-value]


_chosen: dict[torch.dtype, torch.dtype] = {}  # this process's decisions, by input dtype


def cpu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer fed ``dtype`` on CPU computes in (float32 / float64: themselves).

    Decided on the first call per dtype, a plain dict lookup afterwards (which torch.compile
    traces; a ``functools.cache`` wrapper it would not).
    """
    cd = _chosen.get(dtype)
    if cd is None:
        cd = _chosen[dtype] = _decide(dtype)
    return cd


@torch.compiler.assume_constant_result
def _decide(dtype: torch.dtype) -> torch.dtype:
    if dtype not in UNITS:
        return dtype
    mode = policy()
    if mode == "native":
        return dtype
    if mode == "auto" and has_units(dtype) and torch.backends.mkldnn.is_available():
        return dtype
    return torch.float32


def set_cpu_compute(mode: Policy | None) -> None:
    """Override the policy for this process (``None``: back to ``$LORAKIT_CPU_COMPUTE`` / auto).

    Clears the cached decisions, so layers called afterwards follow the new policy.
    """
    global _override
    if mode is not None and mode not in POLICIES:
        raise ValueError(f"CPU compute policy must be one of {', '.join(POLICIES)}, got {mode!r}")
    _override = mode
    _chosen.clear()


def describe() -> str:
    """One line: the 16-bit-relevant CPU flags, torch's CPU capability and the chosen policy."""
    flags = cpu_flags()
    shown = " ".join(f for f in SHOWN if f in flags) or "none read"
    if not any(has_units(d) for d in UNITS):
        shown += " (no bf16/fp16 units)"
    chosen = ", ".join(
        f"{str(d).removeprefix('torch.')} -> {str(cpu_compute_dtype(d)).removeprefix('torch.')}"
        for d in UNITS
    )
    return (
        f"CPU flags: {shown}; "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        f"16-bit CPU compute ({policy()}): {chosen}"
    )


def peak_memory_mib() -> float:
    """Peak memory of this process: CUDA allocations, or (CPU) its peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
