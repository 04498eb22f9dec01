"""What compute_dtype "auto" resolves to, on each CPU kind and on CUDA (the probe patched)."""

from __future__ import annotations

import pytest
import torch

from qdylora import QDyLoRAConfig
from qdylora.core.devices import CPU_BF16_ENV, cpu_has_fast_bf16, fast_compute_dtype
from qdylora.errors import QDyLoRAError


@pytest.fixture
def cpu_flags(monkeypatch):
    """Make the CPU probe report the given flags (and no override in the environment)."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)

    def set_flags(**flags):
        monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: dict(flags))

    return set_flags


@pytest.mark.parametrize("flags, expected", [
    ({"avx2": True, "avx512_bf16": True}, torch.bfloat16),   # AMD EPYC Genoa, Intel Cooper Lake
    ({"avx2": True, "amx_bf16": True}, torch.bfloat16),      # Intel Sapphire Rapids
    ({"avx2": True, "avx512_bf16": False}, torch.float32),   # AVX2 only: bf16 is emulated
    ({}, torch.float32),
])
def test_auto_on_each_cpu_kind(flags, expected, cpu_flags):
    cpu_flags(**flags)
    assert fast_compute_dtype("cpu") == expected
    resolved = QDyLoRAConfig(compute_dtype="auto").resolved_for("cpu")
    assert resolved.torch_compute_dtype == expected
    assert QDyLoRAConfig(compute_dtype="float32").resolved_for("cpu").compute_dtype == "float32"  # explicit wins


def test_probe_failure_means_float32(cpu_flags, monkeypatch):
    def broken():
        raise RuntimeError("no cpuinfo")

    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", broken)
    assert cpu_has_fast_bf16() is False


def test_environment_overrides_the_probe(cpu_flags, monkeypatch):
    cpu_flags(avx512_bf16=True)
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert fast_compute_dtype("cpu") == torch.float32
    cpu_flags()
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert fast_compute_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(QDyLoRAError, match=f"{CPU_BF16_ENV}='yes': set it to 1 .* or 0"):
        fast_compute_dtype("cpu")


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cuda(bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert fast_compute_dtype("cuda") == expected
    assert fast_compute_dtype(torch.device("cuda", 1)) == expected
