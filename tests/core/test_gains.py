"""Rank gains: the table between fitted ranks, the layer's scale g(b) s(b) against a float64
reference (one rank and per-example ranks), and the checks of a gain list."""

from __future__ import annotations

import math

import pytest
import torch

from qdylora.core.gains import check_gains, gain_table, rank_gains, set_rank_gains
from qdylora.errors import QDyLoRAError

from ..conftest import adapted_model
from .test_layer import IN, R, make_layer, reference


def test_table_is_exact_at_fitted_ranks_and_log_linear_between():
    table = gain_table({1: 2.0, 2: 1.5, 8: 1.2}, 16)
    assert len(table) == 16 and table[15] == 1.0  # g(R) = 1 unless fitted
    assert table[0] == 2.0 and table[1] == 1.5 and table[7] == pytest.approx(1.2)
    # rank 4 is halfway between ranks 2 and 8 in log b: the geometric mean of their gains
    assert table[3] == pytest.approx(math.sqrt(1.5 * 1.2))
    assert table[11] == pytest.approx(math.exp(math.log(1.2) * (1 - math.log(12 / 8) / math.log(2))))
    assert gain_table({4: 3.0}, 8)[:4] == (3.0,) * 4  # constant below the smallest fitted rank


@pytest.mark.parametrize("bad", [{1: 0.0}, {1: -1.0}, {1: math.inf}, {0: 2.0}, {9: 2.0}])
def test_table_refuses_bad_gains(bad):
    with pytest.raises(QDyLoRAError, match="rank gain"):
        gain_table(bad, 8)


@pytest.mark.parametrize("bad", [[1.0] * 7, "1", [1.0] * 7 + [math.nan], [1.0] * 7 + [0], [True] * 8, None])
def test_a_gain_list_is_checked(bad):
    with pytest.raises(QDyLoRAError, match="where"):
        check_gains(bad, 8, "where")


@pytest.mark.parametrize("scaling", ["standard", "rslora", "nested"])
@pytest.mark.parametrize("b", [1, 3, R])
def test_layer_scale_includes_the_gain(scaling, b):
    layer = make_layer(torch.float32, scaling).eval()
    gains = tuple(1.5 + 0.1 * k for k in range(R))  # g(b) = 1.5 + 0.1 (b - 1)
    layer.rank_gains = gains
    x = torch.randn(2, 5, IN, dtype=torch.float64).float()
    layer.rank = b
    with torch.no_grad():
        y = layer(x).double()
    base = reference(layer, x, 0)
    expected = base + gains[b - 1] * (reference(layer, x, b) - base)  # float64: W x + g(b) s(b) B A x
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert (expected - reference(layer, x, b)).abs().mean() > 1e-2  # the gain changed the output
    # per-example ranks: each row at its own rank and gain, as one rank at a time
    layer.rank = torch.tensor([b, 0])
    with torch.no_grad():
        rows = layer(x).double()
    torch.testing.assert_close(rows[0], expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rows[1], base[1], rtol=1e-4, atol=1e-4)


def test_set_and_read_the_model_gains(tiny_dir):
    model = adapted_model(tiny_dir("llama"), scaling="nested")
    assert rank_gains(model) is None
    set_rank_gains(model, [2.0] * 8)
    assert rank_gains(model) == (2.0,) * 8 and all(l.rank_gains == (2.0,) * 8 for l in model.adapter_layers().values())
    with pytest.raises(QDyLoRAError, match="8 numbers"):
        set_rank_gains(model, [2.0] * 7)
    set_rank_gains(model, None)
    assert rank_gains(model) is None
