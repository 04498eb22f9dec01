"""Frozen NF4 storage of linear weights, done by bitsandbytes.

bitsandbytes does the quantization and the 4-bit matmul (its `MatMul4Bit` saves only the packed
weight for backward and dequantizes again there). This module only builds `bnb.nn.Linear4bit`
layers with the QLoRA settings (NF4, blocksize 64, double quantization of the absmax) and guards
one CPU pitfall.
"""

from __future__ import annotations

from typing import Union

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .gguf_linear import GGUFLinear

BLOCKSIZE = 64
QUANT_TYPE = "nf4"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like layer as (out_features, in_features).

    GPT-2's `Conv1D` stores it transposed, as (in_features, out_features).
    """
    if isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


def quantize_linear(module: nn.Module, compute_dtype: torch.dtype) -> bnb.nn.Linear4bit:
    """Replace-ready NF4 copy of an `nn.Linear` (or subclass) or a GPT-2 `Conv1D`.

    The quantization runs on the weight's device, so a CUDA weight is quantized on the GPU.
    """
    weight = linear_weight(module).detach()  # (out, in)
    out_features, in_features = weight.shape
    has_bias = getattr(module, "bias", None) is not None
    packed, quant_state = bnbF.quantize_4bit(
        weight.contiguous(),
        blocksize=BLOCKSIZE,
        compress_statistics=True,  # double quantization of the per-block absmax
        quant_type=QUANT_TYPE,
    )
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=has_bias,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type=QUANT_TYPE,
        device="meta",  # no full-precision buffer is allocated for the new layer
    )
    layer.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=quant_state,
        blocksize=BLOCKSIZE,
        compress_statistics=True,
        quant_type=QUANT_TYPE,
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = quant_state
    if has_bias:
        layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    guard_cpu_repacking(layer)
    return layer


def guard_cpu_repacking(layer: bnb.nn.Linear4bit) -> None:
    """Keep the weight in the layout that supports autograd.

    On CPUs with AVX512-BF16, bitsandbytes repacks a `Linear4bit` weight in place the first
    time it runs in eval mode on an input without grad; afterwards its forward has no autograd,
    so training after an evaluation would silently get no gradient through the base.
    """
    layer.support_avx512bf16_for_cpu = False


def dequantized_weight(layer: Union[bnb.nn.Linear4bit, GGUFLinear]) -> torch.Tensor:
    """W~, the dequantized frozen weight (NF4, or a GGUF's blocks), (out_features, in_features) in float32."""
    if isinstance(layer, GGUFLinear):
        return layer.dequantized()
    return bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
