"""NF4 storage: our layers are bitsandbytes' NF4 with double quantization, with its known figures."""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qdylora.core.memory import memory_report
from qdylora.core.quantize import BLOCKSIZE, dequantized_weight, quantize_linear

# bitsandbytes' NF4 code book (see shared notes: the 16 values of the format).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def test_quant_state_is_nf4_blocksize_64_double_quant():
    layer = quantize_linear(nn.Linear(256, 128), torch.bfloat16)
    state = layer.weight.quant_state
    assert state.quant_type == "nf4" and state.blocksize == BLOCKSIZE == 64
    assert state.nested and state.state2.blocksize == 256
    assert state.absmax.dtype == torch.uint8  # 8-bit absmax: the double quantization
    assert tuple(state.shape) == (128, 256) and layer.compute_dtype == torch.bfloat16
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 128 * 256 // 2
    assert not layer.weight.requires_grad


def test_gaussian_weight_figures():
    """~4.13 bits per parameter and ~0.09 relative error (measured: 4.127 and 0.092)."""
    torch.manual_seed(0)
    linear = nn.Linear(2048, 2048, bias=False)
    nn.init.normal_(linear.weight)
    layer = quantize_linear(linear, torch.float32)
    report = memory_report(layer)
    assert 4.12 < report.quantized.bits_per_param < 4.14
    W = linear.weight.detach()
    rel = (dequantized_weight(layer) - W).norm() / W.norm()
    assert 0.085 < rel < 0.10


def test_dequantized_values_are_nf4_codes_times_block_absmax():
    """Every dequantized block is an NF4 code times a per-block scale close to its absmax."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=False)
    layer = quantize_linear(linear, torch.float32)
    W = dequantized_weight(layer).flatten().view(-1, BLOCKSIZE)  # (blocks, 64)
    absmax = linear.weight.detach().flatten().view(-1, BLOCKSIZE).abs().amax(dim=1)
    scale = W.abs().amax(dim=1)  # the code 1.0 (or -1.0) is hit by the absmax element
    # double quantization stores the absmax in 8 bits: close, not exact
    torch.testing.assert_close(scale, absmax, rtol=2e-2, atol=0)
    codes = W / scale[:, None]
    nearest = (codes[..., None] - NF4_CODE).abs().min(dim=-1).values
    assert nearest.max() < 1e-5


def test_same_bits_as_bitsandbytes_quantize():
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    packed, _ = bnbF.quantize_4bit(linear.weight.detach(), blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(quantize_linear(linear, torch.float32).weight.data, packed)


def test_conv1d_weight_is_transposed():
    """GPT-2's Conv1D stores (in, out); the NF4 layer holds (out, in) and computes the same map."""
    torch.manual_seed(0)
    conv = Conv1D(nf=48, nx=64)  # out 48, in 64
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    layer = quantize_linear(conv, torch.float32)
    assert (layer.in_features, layer.out_features) == (64, 48)
    W = dequantized_weight(layer)
    assert (W - conv.weight.T).norm() / conv.weight.norm() < 0.1
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ W.T + conv.bias, rtol=1e-4, atol=1e-4)
        assert (layer(x) - conv(x)).norm() / conv(x).norm() < 0.15


def test_bias_is_kept_unquantized_and_frozen():
    linear = nn.Linear(64, 32)
    layer = quantize_linear(linear, torch.float32)
    assert torch.equal(layer.bias, linear.bias) and not layer.bias.requires_grad


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_eval_forward_does_not_repack_the_weight(compute_dtype):
    """The guard against bitsandbytes' CPU repacking: eval + no-grad keeps the autograd layout."""
    layer = quantize_linear(nn.Linear(128, 64), compute_dtype).eval()
    shape = layer.weight.shape
    with torch.no_grad():
        layer(torch.randn(3, 128))
    assert layer.weight.shape == shape
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    layer.train()
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
