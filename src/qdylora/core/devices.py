"""Which device and compute dtype to use, decided once at the boundary."""

from __future__ import annotations

import os
from typing import Union

import torch

from ..errors import QDyLoRAError

CPU_BF16_ENV = "QDYLORA_CPU_BF16"
"""Environment variable that overrides the CPU probe: "1" = treat this CPU as multiplying bf16
fast, "0" = as not (e.g. to run the test suite as the other CPU kind would)."""


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: Union[str, torch.device, None], preference: bool = False) -> torch.device:
    """The device `name` names (None: `default_device()`). A name torch does not know, or a
    device this machine lacks, is a one-line error; with `preference` (the device a run was
    saved with: a run trained on a GPU opens on a CPU) a missing device gives the default one."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise QDyLoRAError(f"unknown device {str(name)!r}: use cpu, cuda or cuda:N") from None
    problem = _missing(device)
    if problem is None:
        return device
    if preference:
        return default_device()
    raise QDyLoRAError(f"device {str(name)!r}: {problem}; use --device cpu (or leave it out)")


def _missing(device: torch.device) -> Union[str, None]:
    """Why this machine cannot run on `device`, or None."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "this machine has no CUDA device (or this torch build has no CUDA)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else "this machine has no MPS device"
    backend = getattr(torch, device.type, None)
    if backend is not None and getattr(backend, "is_available", lambda: False)():
        return None
    return f"this machine has no {device.type} device"


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX).

    Without it PyTorch emulates bf16 matmul: on an AVX2-only AMD EPYC, a 1024^3 bf16 matmul
    took 3.0 s against 34 ms in float32 (torch 2.13), so float32 is the right default there.
    `QDYLORA_CPU_BF16=1` or `=0` overrides the probe.
    """
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    if override:
        raise QDyLoRAError(f"{CPU_BF16_ENV}={override!r}: set it to 1 (fast bf16) or 0 (no fast bf16), "
                           "or unset it to probe the CPU")
    try:
        caps = torch._C._cpu._get_cpu_capability()  # dict of CPU flags (private, no public API)
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    except (AttributeError, RuntimeError):
        return False


def fast_compute_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """bf16 where its matmuls are fast (bf16-capable GPUs, CPUs with AVX512-BF16/AMX), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32
