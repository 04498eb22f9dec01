"""LoRADelta and dropout_mask against float64 references of the formula."""

from __future__ import annotations

import math

import pytest
import torch

from qdylora.lora_function import LoRADelta, dropout_mask, keep_probability

N, IN, OUT, B = 6, 40, 24, 5
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the largest element: sums of products


def assert_close(got, want, dtype):
    torch.testing.assert_close(got.double(), want, rtol=0, atol=TOL[dtype] * want.abs().max().item())


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, N, IN, generator=g, dtype=torch.float64)
    A = torch.randn(B, IN, generator=g, dtype=torch.float64) / math.sqrt(IN)
    Bm = torch.randn(OUT, B, generator=g, dtype=torch.float64)
    mask = torch.rand(2, N, IN, generator=g) > 0.3
    return x, A, Bm, mask


def reference_grads(x, A, Bm, mask, inv_keep, s, g):
    """Forward and gradients of s * B A (x * mask * inv_keep) by float64 autograd."""
    x, A, Bm = (t.detach().double().requires_grad_() for t in (x, A, Bm))
    xd = x if mask is None else x * mask * inv_keep
    y = s * (xd @ A.T) @ Bm.T
    y.backward(g.double())
    return y.detach(), x.grad, A.grad, Bm.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_mask", [True, False])
def test_forward_and_gradients_match_float64(dtype, with_mask):
    x64, A64, B64, mask = inputs(dtype)
    mask = mask if with_mask else None
    inv_keep, s = 1 / 0.7, 2.5
    x, A, Bm = (t.to(dtype).requires_grad_() for t in (x64, A64, B64))
    y = LoRADelta.apply(x, A, Bm, mask, inv_keep, s, 0)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(g)
    ref = reference_grads(x.detach(), A.detach(), Bm.detach(), mask, inv_keep, s, g)
    for got, want in zip((y, x.grad, A.grad, Bm.grad), ref):
        assert got.dtype == dtype
        assert_close(got, want, dtype)
    assert ref[2].abs().max() > 0.1  # gradients are not trivially zero


def test_frozen_update_keeps_only_the_last_component_gradient():
    x64, A64, B64, mask = inputs(torch.float32)
    x, A, Bm = (t.float().requires_grad_() for t in (x64, A64, B64))
    y = LoRADelta.apply(x, A, Bm, mask, 1.5, 1.0, B - 1)
    g = torch.ones_like(y)
    y.backward(g)
    _, gx, gA, gB = reference_grads(x.detach(), A.detach(), Bm.detach(), mask, 1.5, 1.0, g)
    assert torch.count_nonzero(A.grad[: B - 1]) == 0 and torch.count_nonzero(Bm.grad[:, : B - 1]) == 0
    assert_close(A.grad[B - 1], gA[B - 1], torch.float32)
    assert_close(Bm.grad[:, B - 1], gB[:, B - 1], torch.float32)
    assert_close(x.grad, gx, torch.float32)  # x still sees every component


def test_saves_the_shared_input_not_a_dropped_out_copy():
    """Three adapters on one x (q/k/v) keep x once plus three 1-byte masks."""
    x = torch.randn(64, IN, requires_grad=True)
    A, Bm = torch.randn(B, IN, requires_grad=True), torch.randn(OUT, B, requires_grad=True)
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [LoRADelta.apply(x, A, Bm, dropout_mask(x.shape, 0.1, x.device), 1 / 0.9, 1.0, 0)
                for _ in range(3)]  # kept alive, as a model's graph keeps them
    params = A.numel() * 4 + Bm.numel() * 4
    h = 64 * B * 4
    assert sum(storages.values()) == x.numel() * 4 + 3 * (x.numel() + h) + params
    sum(outs).sum().backward()
    assert x.grad is not None


def test_dropout_mask_keep_rate():
    torch.manual_seed(0)
    n = 1_000_000
    for p in (0.05, 0.5):
        keep = keep_probability(p)
        rate = dropout_mask(torch.Size([n]), p, torch.device("cpu")).float().mean().item()
        assert abs(rate - keep) < 5 * math.sqrt(keep * (1 - keep) / n)  # five standard errors
    assert keep_probability(0.05) == pytest.approx(0.95, abs=2**-16)
    assert dropout_mask(torch.Size([1001]), 0.0, torch.device("cpu")).all()


def test_dropout_mask_elements_are_independent_of_their_neighbours():
    """Both 15-bit halves of a draw are used: neighbouring elements must not be correlated."""
    torch.manual_seed(1)
    m = dropout_mask(torch.Size([400_000]), 0.5, torch.device("cpu")).float()
    corr = torch.corrcoef(torch.stack([m[0::2], m[1::2]]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(200_000)


def test_dropout_mask_follows_the_global_seed():
    torch.manual_seed(7)
    a = dropout_mask(torch.Size([3, 50]), 0.2, torch.device("cpu"))
    torch.manual_seed(7)
    assert torch.equal(a, dropout_mask(torch.Size([3, 50]), 0.2, torch.device("cpu")))
    assert not torch.equal(a, dropout_mask(torch.Size([3, 50]), 0.2, torch.device("cpu")))
