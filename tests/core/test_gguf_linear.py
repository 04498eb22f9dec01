"""GGUFLinear: a frozen layer in GGUF blocks against the float64 formula y = x W^T + b, with W
dequantized by gguf-py; the backward's input gradient; no float weight kept for backward."""

from __future__ import annotations

import pytest
import torch

from qdylora.core import gguf_quants as gq
from qdylora.core.gguf_linear import GGUFLinear

from .test_gguf_quants import random_blocks

gguf = pytest.importorskip("gguf")
IN, OUT = 512, 24
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def layer(qtype: int, dtype: torch.dtype, bias: bool = True) -> tuple[GGUFLinear, torch.Tensor]:
    raw = random_blocks(qtype, OUT, IN, seed=qtype)
    W = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype)).reshape(OUT, IN)
    b = torch.randn(OUT) if bias else None
    return GGUFLinear(torch.from_numpy(raw), qtype, IN, b, dtype), torch.from_numpy(W).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qtype", [gq.Q4_1, gq.Q4_K, gq.Q6_K, gq.Q8_0], ids=lambda t: gq.NAMES.get(t, t))
def test_forward_and_input_gradient_against_float64(qtype, dtype):
    base, W = layer(qtype, dtype)
    x = torch.randn(3, 5, IN, requires_grad=True)
    y = base(x)
    ref = x.detach().double() @ W.t() + base.bias.double()
    assert y.dtype == x.dtype and y.shape == (3, 5, OUT)
    scale = ref.abs().max()
    torch.testing.assert_close(y.double() / scale, ref / scale, **TOL[dtype])
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.double() / (g.double() @ W).abs().max(),
                               (g.double() @ W) / (g.double() @ W).abs().max(), **TOL[dtype])
    assert not base.raw.requires_grad and base.bias.grad is None  # frozen


def test_gradcheck_in_float64():
    base, _ = layer(gq.Q4_K, torch.float64, bias=False)
    x = torch.randn(2, IN, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(base, (x,), eps=1e-6, atol=1e-6)


def test_backward_keeps_only_the_blocks():
    """What autograd saves for the layer's matmul is the raw uint8 blocks, never a float weight."""
    base, _ = layer(gq.Q4_K, torch.float32, bias=False)
    saved = []
    x = torch.randn(4, IN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        base(x).sum().backward()
    assert saved and all(t.dtype == torch.uint8 for t in saved if t.numel() >= OUT * IN // 8)
    assert sum(t.numel() * t.element_size() for t in saved) <= base.raw.numel() + x.numel() * 4


def test_bad_blocks_are_refused():
    raw = torch.zeros(OUT, 10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="do not hold rows"):
        GGUFLinear(raw, gq.Q4_K, IN)
    from qdylora.errors import QDyLoRAError

    with pytest.raises(QDyLoRAError, match="not supported"):
        GGUFLinear(raw, 16, IN)  # IQ2_XXS
