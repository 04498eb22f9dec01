"""LoRADelta and dropout_mask against float64 references of the formula."""

from __future__ import annotations

import math

import pytest
import torch

from qdylora.core.lora_function import LoRADelta, dropout_mask, keep_probability

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


def reference_grads(x, A, Bm, mask, inv_keep, c, g):
    """Forward and gradients of ((x * mask * inv_keep) A^T * c) B^T by float64 autograd; c is
    a scalar or broadcasts to (..., b)."""
    x, A, Bm = (t.detach().double().requires_grad_() for t in (x, A, Bm))
    c = c.double() if torch.is_tensor(c) else c
    xd = x if mask is None else x * mask * inv_keep
    y = ((xd @ A.T) * c) @ Bm.T
    y.backward(g.double())
    return y.detach(), x.grad, A.grad, Bm.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_mask", [True, False])
def test_forward_and_gradients_match_float64(dtype, with_mask):
    x64, A64, B64, mask = inputs(dtype)
    mask = mask if with_mask else None
    inv_keep, s = 1 / 0.7, 2.5
    x, A, Bm = (t.to(dtype).requires_grad_() for t in (x64, A64, B64))
    y = LoRADelta.apply(x, A, Bm, mask, inv_keep, s, None)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(g)
    ref = reference_grads(x.detach(), A.detach(), Bm.detach(), mask, inv_keep, s, g)
    for got, want in zip((y, x.grad, A.grad, Bm.grad), ref):
        assert got.dtype == dtype
        assert_close(got, want, dtype)
    assert ref[2].abs().max() > 0.1  # gradients are not trivially zero


def test_a_bfloat16_gradient_into_a_float32_delta():
    """Under autocast (transformers' Trainer with bf16=True, TRL's default) the ops after the
    adapter run in bfloat16, so the gradient arriving at a float32 LoRADelta is bfloat16: its
    backward failed with a dtype mismatch. The gradients keep float32 and match float64."""
    x64, A64, B64, mask = inputs(torch.float32)
    x, A, Bm = (t.float().requires_grad_() for t in (x64, A64, B64))
    y = LoRADelta.apply(x, A, Bm, mask, 1 / 0.7, 2.5, None)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y.backward(g)
    ref = reference_grads(x.detach(), A.detach(), Bm.detach(), mask, 1 / 0.7, 2.5, g.float())
    for got, want in zip((x.grad, A.grad, Bm.grad), ref[1:]):
        assert got.dtype == torch.float32
        assert_close(got, want, torch.float32)


def component_weights(kind, dtype, seed=2):
    """c for per-example ranks (each row of x weighs its own first components) or for a mixture
    of ranks (one decreasing weight per component), float64 values exactly representable."""
    g = torch.Generator().manual_seed(seed)
    if kind == "per-row":  # rows of x are (2, N): rank b_i in 0..B, weight s_i on its first b_i
        ranks = torch.randint(0, B + 1, (2, 1), generator=g)
        s = torch.tensor([[2.0], [0.5]])
        return (s * (torch.arange(B) < ranks)).view(2, 1, B).to(dtype)
    return torch.tensor([4.0, 2.5, 1.5, 0.75, 0.25]).to(dtype)  # (B,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["per-row", "per-component"])
def test_weighted_components_match_float64(kind, dtype):
    """c as a tensor: per-example ranks (training through mixed-rank batches) and a rank
    mixture's component weights; forward and all three gradients against float64."""
    x64, A64, B64, mask = inputs(dtype)
    c = component_weights(kind, dtype)
    x, A, Bm = (t.to(dtype).requires_grad_() for t in (x64, A64, B64))
    y = LoRADelta.apply(x, A, Bm, mask, 1 / 0.7, c, None)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(g)
    ref = reference_grads(x.detach(), A.detach(), Bm.detach(), mask, 1 / 0.7, c, g)
    for got, want in zip((y, x.grad, A.grad, Bm.grad), ref):
        assert got.dtype == dtype
        assert_close(got, want, dtype)
    assert ref[2].abs().max() > 0.1


def test_per_row_trained_mask_limits_each_rows_gradient():
    """Frozen update with per-example ranks: row i trains only its component b_i - 1, so the
    gradient of A and B is the sum over rows of each row's own one-component gradient."""
    x64, A64, B64, mask = inputs(torch.float32)
    ranks = torch.tensor([2, 5]).view(2, 1, 1)
    comps = torch.arange(B).view(1, 1, B)
    c = (torch.tensor([8.0, 3.2]).view(2, 1, 1) * (comps < ranks)).float()  # (2, 1, B)
    trained = comps == ranks - 1  # (2, 1, B)
    x, A, Bm = (t.float().requires_grad_() for t in (x64, A64, B64))
    y = LoRADelta.apply(x, A, Bm, mask, 1.5, c, trained)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    y.backward(g)
    want_A, want_B = torch.zeros_like(A64), torch.zeros_like(B64)
    for i in range(2):  # row i alone, then only its component b_i - 1 kept
        b = int(ranks[i])
        _, _, gA, gB = reference_grads(x[i].detach(), A.detach(), Bm.detach(), mask[i], 1.5, c[i], g[i])
        want_A[b - 1] += gA[b - 1]
        want_B[:, b - 1] += gB[:, b - 1]
    assert_close(A.grad, want_A, torch.float32)
    assert_close(Bm.grad, want_B, torch.float32)
    _, gx, _, _ = reference_grads(x.detach(), A.detach(), Bm.detach(), mask, 1.5, c, g)
    assert_close(x.grad, gx, torch.float32)  # x sees every component


def test_frozen_update_keeps_only_the_last_component_gradient():
    x64, A64, B64, mask = inputs(torch.float32)
    x, A, Bm = (t.float().requires_grad_() for t in (x64, A64, B64))
    y = LoRADelta.apply(x, A, Bm, mask, 1.5, 1.0, torch.arange(B) == B - 1)
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
        outs = [LoRADelta.apply(x, A, Bm, dropout_mask(x.shape, 0.1, x.device), 1 / 0.9, 1.0, None)
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
