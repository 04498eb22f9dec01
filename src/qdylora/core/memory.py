"""`memory_report`: bytes and bits per parameter of the NF4 weights, the adapters and the rest."""

from __future__ import annotations

import resource

from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from torch import nn

from .gguf_linear import GGUFLinear
from .layer import QDyLoRALinear


@dataclass(frozen=True)
class MemoryPart:
    """One part of the model: `params` logical parameters stored in `bytes` bytes."""

    params: int
    bytes: int

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0


@dataclass(frozen=True)
class MemoryReport:
    """Where a QDyLoRA model's memory goes (weights only; activations and optimizer excluded)."""

    quantized: MemoryPart
    """Frozen quantized weights of the linear layers: NF4 (packed 4-bit codes, 8-bit absmax of
    the double quantization, its float32 second-level absmax, the code tables and offsets), or a
    GGUF's blocks as the file holds them (scales included)."""
    adapter: MemoryPart
    """Trainable A and B of every adapter, at max_rank, float32."""
    other: MemoryPart
    """Everything else: embeddings, norms, output head, linear biases (unquantized, frozen)."""
    base_format: str = "nf4"
    """How the quantized part is stored: nf4, or gguf (the file's own blocks)."""

    @property
    def total(self) -> MemoryPart:
        parts = (self.quantized, self.adapter, self.other)
        return MemoryPart(sum(p.params for p in parts), sum(p.bytes for p in parts))

    def __str__(self) -> str:
        kind = "GGUF-block" if self.base_format == "gguf" else "NF4"
        rows = [(f"frozen {kind} linears", self.quantized), ("adapters (A, B)", self.adapter),
                ("other (embeddings, norms, head)", self.other), ("total", self.total)]
        lines = [f"{'part':<32}{'params':>14}{'MiB':>11}{'bits/param':>12}"]
        for label, part in rows:
            lines.append(
                f"{label:<32}{part.params:>14,}{part.bytes / 2**20:>11.2f}{part.bits_per_param:>12.3f}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            name: {"params": part.params, "bytes": part.bytes, "bits_per_param": part.bits_per_param}
            for name, part in (("quantized", self.quantized), ("adapter", self.adapter),
                               ("other", self.other), ("total", self.total))
        }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_report(model: nn.Module) -> MemoryReport:
    """Count every parameter and buffer once (tied weights once) into the three parts."""
    seen: set[int] = set()
    q_params = q_bytes = a_params = a_bytes = o_params = o_bytes = 0

    def first_time(t: torch.Tensor) -> bool:
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            return False
        seen.add(key)
        return True

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            if first_time(module.weight):
                q_params += module.in_features * module.out_features
                q_bytes += _nbytes(module.weight)
                stats = [state.absmax, state.code, state.offset]
                if state.nested:
                    stats += [state.state2.absmax, state.state2.code]
                q_bytes += sum(_nbytes(t) for t in stats if isinstance(t, torch.Tensor))
        if isinstance(module, GGUFLinear) and first_time(module.raw):  # the file's blocks
            q_params += module.in_features * module.out_features
            q_bytes += _nbytes(module.raw)
        if isinstance(module, QDyLoRALinear):
            for p in (module.lora_A, module.lora_B):
                if first_time(p):
                    a_params += p.numel()
                    a_bytes += _nbytes(p)
    for module in model.modules():
        if isinstance(module, QDyLoRALinear):
            continue
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, t in own:
            if (isinstance(module, bnb.nn.Linear4bit) and name == "weight") or (
                    isinstance(module, GGUFLinear) and name == "raw"):
                continue
            if first_time(t):
                o_params += t.numel()
                o_bytes += _nbytes(t)
    fmt = getattr(getattr(model, "qdylora_config", None), "base_format", "nf4")
    return MemoryReport(
        MemoryPart(q_params, q_bytes), MemoryPart(a_params, a_bytes), MemoryPart(o_params, o_bytes), fmt
    )


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated CUDA memory on a GPU, peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
