"""A frozen linear layer kept in a GGUF file's own quantized blocks (issue 40): the base a user
serves in llama.cpp / Ollama, not a requantization of it.

The weight stays as the file's raw bytes (uint8 (out, row_bytes), `gguf_quants`); the forward
dequantizes it in float32, exactly as gguf-py and ggml do, casts it to the compute dtype and
multiplies; the backward dequantizes it again for the input's gradient. So no float copy of a
layer's weight outlives its matmul: the frozen part costs the file's bytes (torchao's
`LinearNF4` and bitsandbytes' `MatMul4Bit` do the same for NF4).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import gguf_quants


class GGUFMatmul(torch.autograd.Function):
    """y (..., out) = x (..., in) @ W^T, W dequantized from `raw` in forward and again in
    backward; only x gets a gradient (the base is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, raw: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
        W = gguf_quants.dequantize(raw, qtype, in_features).to(x.dtype)  # (out, in)
        ctx.save_for_backward(raw)
        ctx.qtype, ctx.in_features = qtype, in_features
        return x @ W.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raw, = ctx.saved_tensors
        W = gguf_quants.dequantize(raw, ctx.qtype, ctx.in_features).to(grad.dtype)  # (out, in)
        return grad @ W, None, None, None  # (..., in)


class GGUFLinear(nn.Module):
    """A frozen linear layer whose weight is GGUF blocks of type `qtype`, computing in
    `compute_dtype` (the output comes back in the input's dtype, as bitsandbytes' Linear4bit)."""

    def __init__(self, raw: torch.Tensor, qtype: int, in_features: int, bias: Optional[torch.Tensor] = None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if not gguf_quants.supported(qtype):
            from ..errors import QDyLoRAError

            raise QDyLoRAError(f"GGUF block type {qtype} is not supported: {', '.join(gguf_quants.NAMES.values())} are")
        if raw.dtype != torch.uint8 or raw.shape[1] != gguf_quants.row_bytes(qtype, in_features):
            raise ValueError(f"raw blocks {tuple(raw.shape)} {raw.dtype} do not hold rows of {in_features} "
                             f"{gguf_quants.NAMES[qtype]} values")
        self.register_buffer("raw", raw)  # (out, row_bytes) uint8: the file's bytes
        self.qtype, self.in_features, self.out_features = qtype, in_features, raw.shape[0]
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.compute_dtype = compute_dtype

    @property
    def weight_device(self) -> torch.device:
        return self.raw.device

    def dequantized(self) -> torch.Tensor:
        """(out, in) float32: the weight as llama.cpp dequantizes it."""
        return gguf_quants.dequantize(self.raw, self.qtype, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = GGUFMatmul.apply(x.to(self.compute_dtype), self.raw, self.qtype, self.in_features)  # (..., out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, type={gguf_quants.NAMES[self.qtype]}, "
                f"compute_dtype={self.compute_dtype}")
