"""What the machine computes fast: native bfloat16 support of the device, and the precision `dtype: auto` picks
from it (bfloat16 on a GPU or CPU that computes it natively, float32 elsewhere).

A CPU without AVX512-BF16 or AMX emulates bfloat16 matmuls, which is far slower than float32 (measured on a
2-core AVX2 EPYC: a LoRA step of the demo model took 6 s in float32 and did not finish in 500 s in bfloat16), so
the choice is probed, never assumed from the machine a recipe was written on.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

log = logging.getLogger("safeft.hardware")

# CPU flags (as /proc/cpuinfo names them) that give native bfloat16 matmuls.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# What an explicit bfloat16 costs on a CPU without them (the AVX2 measurement above).
EMULATED_BF16_SLOWDOWN = "more than 20x"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine()
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """From the CPU flags; SAFEFT_CPU_BF16=0 (or 1) overrides the probe, e.g. to time on an AVX512 machine what
    an AVX2 machine will run."""
    override = os.environ.get("SAFEFT_CPU_BF16")
    if flags is None and override in ("0", "1"):
        return override == "1"
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bf16(device: str | None = None, flags: set[str] | None = None) -> bool:
    """Whether `device` (default: the one training/generation will use) computes bfloat16 natively."""
    device = device or device_kind()
    if device == "cuda":
        import torch

        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bf16(flags)


def resolve_dtype(requested: str | None, device: str | None = None, flags: set[str] | None = None) -> dict:
    """The precision to run in and why: {"dtype", "requested", "device", "native_bf16", "warning"}.

    `auto` (or None) gives bfloat16 where the device computes it natively and float32 elsewhere. An explicit
    bfloat16 on a CPU without native support is honoured, with a warning that says what it costs.
    """
    requested = requested or "auto"
    device = device or device_kind()
    native = native_bf16(device, flags)
    warning = None
    if requested == "auto":
        dtype = "bfloat16" if native else "float32"
    else:
        dtype = requested
        if dtype == "bfloat16" and device == "cpu" and not native:
            warning = (f"dtype bfloat16 on a CPU without native bfloat16 ({', '.join(NATIVE_BF16_FLAGS)} absent): "
                       f"emulated, {EMULATED_BF16_SLOWDOWN} slower than float32; use dtype: auto or float32")
    return {"dtype": dtype, "requested": requested, "device": device, "native_bf16": native, "warning": warning}


def describe() -> dict:
    """A short description of the machine for logs and manifests."""
    info = {"cpu": cpu_model(), "cpu_native_bf16": cpu_has_native_bf16(), "device": device_kind()}
    if info["device"] == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info
