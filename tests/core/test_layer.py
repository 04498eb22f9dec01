"""QDyLoRALinear against a float64 reference of y = W~ x + bias + s(b) B[:, :b] A[:b] x."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qdylora.core.layer import QDyLoRALinear
from qdylora.core.lora_function import dropout_mask, keep_probability
from qdylora.core.quantize import dequantized_weight, quantize_linear
from qdylora.core.scaling import RankMixture
from qdylora.errors import QDyLoRAError

IN, OUT, R, ALPHA = 96, 80, 16, 8.0
# bf16 keeps 8 bits of mantissa: relative error ~2^-8 per rounding, a few roundings deep.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def make_layer(dtype=torch.float32, scaling="standard", mode="full", dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=bias)
    layer = QDyLoRALinear(quantize_linear(linear, dtype), R, ALPHA, scaling, dropout, mode, dtype)
    with torch.no_grad():  # a trained-looking adapter: B is not zero
        layer.lora_B.normal_(0, 0.5)
    return layer


def reference(layer: QDyLoRALinear, x: torch.Tensor, b: int) -> torch.Tensor:
    """float64 formula from the dequantized weight."""
    W = dequantized_weight(layer.base).double()  # (out, in)
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    s = 0.0 if b == 0 else {"standard": ALPHA / b, "rslora": ALPHA / math.sqrt(b),
                            "nested": ALPHA / math.sqrt(R)}[layer.scaling]
    y = x.double() @ W.T + s * (x.double() @ A[:b].T) @ B[:, :b].T
    if layer.base.bias is not None:
        y = y + layer.base.bias.double()
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", ["standard", "rslora", "nested"])
@pytest.mark.parametrize("b", [1, 3, R])
def test_matches_float64_reference(dtype, scaling, b):
    layer = make_layer(dtype, scaling).eval()
    layer.rank = b
    x = torch.randn(2, 5, IN)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == x.dtype  # output follows the input's dtype
    ref = reference(layer, x, b)
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])
    # the adapter term is large enough here that a wrong scale or rank would fail the check
    assert (ref - reference(layer, x, 0)).abs().mean() > 0.1


def test_bf16_input_gives_bf16_output():
    layer = make_layer(torch.bfloat16).eval()
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference(layer, x, R), **TOL[torch.bfloat16])


def test_rank_uses_exactly_the_first_b_components():
    layer = make_layer().eval()
    x = torch.randn(4, IN)
    b = 5
    layer.rank = b
    with torch.no_grad():
        before = layer(x)
        layer.lora_A[b:].normal_()  # components at or past b must not matter
        layer.lora_B[:, b:].normal_()
        after = layer(x)
        assert torch.equal(before, after)
        layer.lora_A[b - 1].normal_()  # component b-1 must matter
        assert not torch.allclose(layer(x), before)


@pytest.mark.parametrize("b", range(0, R + 1))
def test_fresh_adapter_equals_base(b):
    torch.manual_seed(1)
    layer = QDyLoRALinear(quantize_linear(nn.Linear(IN, OUT), torch.float32), R, ALPHA).eval()
    layer.rank = b
    x = torch.randn(3, IN)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base(x))
    assert layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() == 0


def test_init_is_kaiming_uniform():
    torch.manual_seed(2)
    layer = QDyLoRALinear(quantize_linear(nn.Linear(IN, OUT), torch.float32), R, ALPHA)
    bound = 1 / math.sqrt(IN)  # kaiming_uniform(a=sqrt(5)) on fan_in = in_features
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.9 * bound
    assert abs(layer.lora_A.std().item() - bound / math.sqrt(3)) < 0.1 * bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_per_example_ranks_equal_separate_runs(dtype, mode):
    layer = make_layer(dtype, mode=mode).eval()
    ranks = [0, 1, 4, R, 7]
    x = torch.randn(len(ranks), 6, IN)
    layer.rank = torch.tensor(ranks)
    with torch.no_grad():
        mixed = layer(x)
        for i, b in enumerate(ranks):
            layer.rank = b
            alone = layer(x[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], alone, **TOL[dtype])
            torch.testing.assert_close(mixed[i : i + 1].double(), reference(layer, x[i : i + 1], b), **TOL[dtype])


def test_per_example_ranks_on_flattened_tokens():
    """OPT's MLP sees (batch * seq, in); per-example ranks follow the batch-major order."""
    layer = make_layer().eval()
    x = torch.randn(3, 4, IN)
    layer.rank = torch.tensor([1, 2, 9])
    with torch.no_grad():
        assert torch.allclose(layer(x.reshape(12, IN)), layer(x).reshape(12, OUT), atol=1e-6)


def _grads(layer, x, rank):
    layer.zero_grad()
    layer.rank = rank
    layer(x).square().sum().backward()
    return layer.lora_A.grad, layer.lora_B.grad


def nonzero_rows(g):  # indices of A-rows / B-columns that received gradient
    return set(torch.nonzero(g.abs().sum(dim=1)).flatten().tolist())


@pytest.mark.parametrize("b", [1, 6, R])
def test_full_mode_trains_the_first_b_components(b):
    layer = make_layer(mode="full").train()
    gA, gB = _grads(layer, torch.randn(4, IN), b)
    assert nonzero_rows(gA) == set(range(b))
    assert nonzero_rows(gB.T) == set(range(b))
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


@pytest.mark.parametrize("b", [1, 6, R])
def test_frozen_mode_trains_only_component_b(b):
    layer = make_layer(mode="frozen").train()
    gA, gB = _grads(layer, torch.randn(4, IN), b)
    assert nonzero_rows(gA) == {b - 1}
    assert nonzero_rows(gB.T) == {b - 1}


def test_frozen_mode_gradient_equals_full_mode_on_component_b():
    """Detaching earlier components changes which entries train, not the forward value or the
    gradient of component b-1."""
    x, b = torch.randn(4, IN), 6
    full, frozen = make_layer(mode="full").train(), make_layer(mode="frozen").train()
    with torch.no_grad():
        full.rank = frozen.rank = b
        assert torch.equal(full(x), frozen(x))
    gA_full, gB_full = (g.clone() for g in _grads(full, x, b))
    gA_frozen, gB_frozen = _grads(frozen, x, b)
    torch.testing.assert_close(gA_frozen[b - 1], gA_full[b - 1])
    torch.testing.assert_close(gB_frozen[:, b - 1], gB_full[:, b - 1])


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_per_example_gradients_match_separate_runs(mode):
    """Gradients of a mixed-rank batch equal the sum of each example's gradient alone."""
    layer = make_layer(mode=mode).train()
    ranks, x = [2, 5, 5, R], torch.randn(4, 3, IN)
    gA, gB = (g.clone() for g in _grads(layer, x, torch.tensor(ranks)))
    sum_A, sum_B = torch.zeros_like(gA), torch.zeros_like(gB)
    for i, b in enumerate(ranks):
        a, bb = _grads(layer, x[i : i + 1], b)
        sum_A += a
        sum_B += bb
    torch.testing.assert_close(gA, sum_A, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gB, sum_B, rtol=1e-4, atol=1e-5)


def test_input_gradient_flows_through_the_quantized_base():
    layer = make_layer().train()
    layer.rank = 3
    x = torch.randn(2, IN, dtype=torch.float64).float().requires_grad_()
    layer(x).sum().backward()
    W = dequantized_weight(layer.base).double()
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    expected = torch.ones(2, OUT, dtype=torch.float64) @ (W + ALPHA / 3 * B[:, :3] @ A[:3])
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-4, atol=1e-4)


def test_dropout_applies_to_the_adapter_input_only():
    layer = make_layer(dropout=0.5).train()
    layer.rank = R
    x = torch.randn(8, IN)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    x_dropped = x * dropout_mask(x.shape, 0.5, x.device) / keep_probability(0.5)  # the layer's only draw
    W = dequantized_weight(layer.base).double()
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    ref = x.double() @ W.T + layer.base.bias.double() + ALPHA / R * (x_dropped.double() @ A.T) @ B.T
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    layer.eval()  # no dropout in eval
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), reference(layer, x, R), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scaling", ["standard", "rslora", "nested"])
def test_rank_mixture_is_the_expected_adapter(scaling):
    """A RankMixture runs E_b[s(b) B[:, :b] A[:b]] in one forward: its output is the
    probability-weighted sum of the rank-b outputs (float64 reference), and for a loss linear in
    the output so is its gradient."""
    probs = {1: 0.25, 4: 0.5, R: 0.25}
    layer = make_layer(scaling=scaling).train()
    x = torch.randn(5, IN)
    W = dequantized_weight(layer.base).double()
    base = x.double() @ W.T + layer.base.bias.double()
    with torch.no_grad():
        layer.rank = RankMixture.of({1: 1, 4: 2, R: 1})  # normalised to probs
        mixed = layer(x).double()
    expected = base + sum(p * (reference(layer, x, b) - base) for b, p in probs.items())
    torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-4)

    g = torch.randn(5, OUT)
    layer.zero_grad()
    layer.rank = RankMixture.of(probs)
    (layer(x) * g).sum().backward()
    gA, gB = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    want_A, want_B = torch.zeros_like(gA), torch.zeros_like(gB)
    for b, p in probs.items():
        layer.zero_grad()
        layer.rank = b
        (layer(x) * g).sum().backward()
        want_A += p * layer.lora_A.grad
        want_B += p * layer.lora_B.grad
    torch.testing.assert_close(gA, want_A, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gB, want_B, rtol=1e-4, atol=1e-5)
    assert nonzero_rows(gA) == set(range(R))  # every component trains, in one forward


def test_rank_mixture_weights_and_refusals():
    mix = RankMixture.of({2: 1.0, 4: 3.0})
    assert mix.probabilities == ((2, 0.25), (4, 0.75)) and mix.max_rank == 4
    c = mix.component_weights(8.0, "standard", 16)  # c_k = sum over b > k of p(b) * 8 / b
    torch.testing.assert_close(c, torch.tensor([0.25 * 4 + 0.75 * 2, 0.25 * 4 + 0.75 * 2, 1.5, 1.5],
                                                dtype=torch.float64))
    layer = make_layer(mode="frozen").train()
    layer.rank = mix
    with pytest.raises(QDyLoRAError, match="mixture trains every component"):
        layer(torch.randn(2, IN))


def test_nested_scale_makes_rank_b_the_first_b_components_of_the_full_adapter():
    """Under "nested" every rank uses the scale of the full adapter, so the delta at rank b is the
    full delta cut to its first b components, nothing rescaled."""
    layer = make_layer(scaling="nested").eval()
    x = torch.randn(3, IN)
    W = dequantized_weight(layer.base).double()
    base = x.double() @ W.T + layer.base.bias.double()
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    for b in (1, 5, R):
        layer.rank = b
        with torch.no_grad():
            delta = layer(x).double() - base
        torch.testing.assert_close(delta, ALPHA / math.sqrt(R) * (x.double() @ A[:b].T) @ B[:, :b].T,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scaling", ["standard", "rslora", "nested"])
def test_factors_of_rank_b_are_the_delta_the_forward_adds(scaling):
    """`factors` / `delta_weight`, the exporters' one home of s(b) B[:, :b] A[:b], against the
    float64 formula and against what the forward adds (x @ delta^T), gains included."""
    layer = make_layer(scaling=scaling)
    layer.rank_gains = tuple(1.0 + 0.1 * k for k in range(R))  # g(b) must go into s(b)
    x = torch.randn(5, IN)
    for b in (1, 3, R):
        A, B, s = layer.factors(b)
        assert A.shape == (b, IN) and B.shape == (OUT, b) and not A.requires_grad
        base = {"standard": ALPHA / b, "rslora": ALPHA / math.sqrt(b), "nested": ALPHA / math.sqrt(R)}[scaling]
        assert s == pytest.approx(base * layer.rank_gains[b - 1])
        expected = s * layer.lora_B[:, :b].detach().double() @ layer.lora_A[:b].detach().double()
        assert torch.allclose(layer.delta_weight(b).double(), expected, rtol=1e-5, atol=1e-6)
        assert layer.delta_weight(b).abs().max() > 0  # not a no-op
        layer.rank = b
        with torch.no_grad():
            layer.rank = 0
            off = layer(x)
            layer.rank = b
            added = layer(x) - off
        torch.testing.assert_close(added.double(), x.double() @ expected.t(), **TOL[torch.float32])
