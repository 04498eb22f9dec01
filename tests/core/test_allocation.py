"""Per-layer ranks under a budget, and the data-aware orders: float64 brute force of each formula."""

from __future__ import annotations

import itertools

import pytest
import torch

from qdylora.core.allocation import (Allocation, allocate, allocation_from_record, hull_segments, parse_budget,
                                     tail_errors)
from qdylora.core.ordering import weighted_factors
from qdylora.errors import QDyLoRAError


def psd(n: int, g: torch.Generator, rank: int | None = None) -> torch.Tensor:
    X = torch.randn(n, rank or n, generator=g, dtype=torch.float64)
    return X @ X.T


def weighted_error(Mo, Mi, E) -> float:
    """tr(Mo E Mi E^T), the brute-force criterion on out x in matrices."""
    return float(torch.trace(Mo @ E @ Mi @ E.T))


def best_weighted_errors(Mo, Mi, D, R: int) -> torch.Tensor:
    """min over rank-b matrices of tr(Mo (D - X) Mi (D - X)^T), b = 0..R: the tail sums of the
    squared singular values of Mo^1/2 D Mi^1/2 (zero past its rank)."""
    def root(M):
        e, V = torch.linalg.eigh(M)
        return (V * e.clamp(min=0).sqrt()) @ V.T
    s = torch.linalg.svdvals(root(Mo) @ D @ root(Mi))
    tails = torch.cat([(s**2).flip(0).cumsum(0).flip(0), s.new_zeros(max(1, R + 1 - s.numel()))])
    return tails[:R + 1]


def test_tail_errors_are_the_criterion_of_each_prefix():
    g = torch.Generator().manual_seed(0)
    R, out_f, in_f, c = 5, 7, 6, 0.7
    A = torch.randn(R, in_f, generator=g, dtype=torch.float64)
    B = torch.randn(out_f, R, generator=g, dtype=torch.float64)
    Mo, Mi = psd(out_f, g), psd(in_f, g)
    e = tail_errors(B.T @ Mo @ B, A @ Mi @ A.T, c)
    assert e.shape == (R + 1,)
    for b in range(R + 1):
        tail = c * B[:, b:] @ A[b:]
        assert e[b].item() == pytest.approx(weighted_error(Mo, Mi, tail), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("case", ["full", "low-rank B", "metric sees part", "tall-thin"])
def test_weighted_factors_are_optimal_at_every_prefix(case):
    g = torch.Generator().manual_seed(1)
    out_f, in_f, R = (4, 9, 6) if case == "tall-thin" else (10, 9, 6)
    A = torch.randn(R, in_f, generator=g, dtype=torch.float64)
    B = torch.randn(out_f, R, generator=g, dtype=torch.float64)
    if case == "low-rank B":
        B = B[:, :3] @ torch.randn(3, R, generator=g, dtype=torch.float64)
    Mo = psd(out_f, g, rank=2) if case == "metric sees part" else psd(out_f, g)
    Mi = psd(in_f, g)
    c, c_new = 2.0, 16 / R**0.5
    D = c * B @ A
    A2, B2 = weighted_factors(A, B, c, c_new, B.T @ Mo @ B, A @ Mi @ A.T)
    torch.testing.assert_close(c_new * B2 @ A2, D, rtol=0, atol=1e-9)  # the full rank is the delta
    best = best_weighted_errors(Mo, Mi, D, R)
    scale = float(best[0])
    for b in range(R + 1):
        got = weighted_error(Mo, Mi, D - c_new * B2[:, :b] @ A2[:b])
        assert got == pytest.approx(float(best[b]), abs=1e-9 * scale), b
    # and the new factors' own tail errors are these optimal errors (the allocation's input)
    e = tail_errors(B2.T @ Mo @ B2, A2 @ Mi @ A2.T, c_new)
    torch.testing.assert_close(e, best, rtol=0, atol=1e-9 * scale)


def test_output_order_on_samples_beats_svd_on_the_output_error():
    """The output order (N = E[(A x)(A x)^T] from samples, M = B^T B) against the SVD order:
    never worse on E||(D - D_b) x||^2 at any b, and the SVD order never worse on ||D - D_b||_F."""
    from qdylora.core.ordering import svd_factors

    g = torch.Generator().manual_seed(2)
    R, out_f, in_f = 6, 10, 12
    A = torch.randn(R, in_f, generator=g, dtype=torch.float64)
    B = torch.randn(out_f, R, generator=g, dtype=torch.float64)
    x = torch.randn(500, in_f, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, in_f, dtype=torch.float64)
    c = 1.5
    D = c * B @ A
    q = x @ A.T  # (n, R)
    A_o, B_o = weighted_factors(A, B, c, c, B.T @ B, q.T @ q / len(x))
    A_s, B_s = svd_factors(A, B, c, c)
    for b in range(1, R):
        def out_err(A2, B2):
            return float((x @ (D - c * B2[:, :b] @ A2[:b]).T).pow(2).sum(1).mean())

        def weight_err(A2, B2):
            return float((D - c * B2[:, :b] @ A2[:b]).pow(2).sum())

        assert out_err(A_o, B_o) <= out_err(A_s, B_s) + 1e-9
        assert weight_err(A_s, B_s) <= weight_err(A_o, B_o) + 1e-9
    assert out_err(A_o, B_o) < out_err(A_s, B_s) - 1e-6  # b = R-1 here; the orders differ somewhere


def test_hull_keeps_the_prefix_order_and_decreasing_gains():
    e = torch.tensor([10.0, 9.0, 4.0, 3.5, 3.4, 0.0], dtype=torch.float64)  # not convex: 1 -> 2 gains more
    segments = hull_segments("l", e)
    assert [(s.start, s.end) for s in segments][0][0] == 0
    assert all(a.end == b.start for a, b in zip(segments, segments[1:])) and segments[-1].end == 5
    per = [s.gain / (s.end - s.start) for s in segments]
    assert all(x >= y for x, y in zip(per, per[1:]))
    assert sum(s.gain for s in segments) == pytest.approx(10.0)


def _total(errors, ranks):
    return sum(float(errors[p][r]) for p, r in ranks.items())


@pytest.mark.parametrize("budget", [0, 1, 3, 5, 8, 12])
def test_equal_costs_greedy_equals_brute_force(budget):
    """Equal costs, errors with decreasing gains: the greedy is optimal (checked exhaustively)."""
    g = torch.Generator().manual_seed(3)
    R, layers = 4, ["a", "b", "c"]
    errors = {}
    for p in layers:
        gains = (torch.rand(R, generator=g, dtype=torch.float64).sort(descending=True).values
                 * (1 + 9 * torch.rand(1, generator=g, dtype=torch.float64)))
        errors[p] = torch.cat([gains.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
    costs = {p: 1 for p in layers}
    ranks = allocate(errors, costs, budget)
    best = min(_total(errors, dict(zip(layers, combo))) for combo in itertools.product(range(R + 1), repeat=3)
               if sum(combo) <= budget)
    assert sum(ranks.values()) == min(budget, R * 3)
    assert _total(errors, ranks) == pytest.approx(best)


def test_budget_is_met_and_nothing_more_fits():
    g = torch.Generator().manual_seed(4)
    R = 8
    costs = {"q": 1152, "k": 768, "up": 2112, "down": 2112}
    errors = {p: torch.cat([torch.rand(R, generator=g, dtype=torch.float64).cumsum(0).flip(0),
                            torch.zeros(1, dtype=torch.float64)]) for p in costs}
    for budget in (0, 500, 1000, 5000, 2 * sum(costs.values()) + 17, 20000, 10**9):
        ranks = allocate(errors, costs, budget)
        used = sum(r * costs[p] for p, r in ranks.items())
        assert used <= budget
        assert all(r == R or budget - used < costs[p] for p, r in ranks.items())  # nothing else fits


def test_uniform_errors_give_a_uniform_allocation():
    e = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    costs = {f"l{i}": 10 for i in range(5)}
    ranks = allocate({p: e for p in costs}, costs, 2 * 50)
    assert set(ranks.values()) == {2}


def test_allocation_prefers_the_layer_that_matters():
    big = torch.tensor([100.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    small = torch.tensor([1.0, 0.5, 0.2, 0.0], dtype=torch.float64)
    ranks = allocate({"big": big, "small": small}, {"big": 1, "small": 1}, 2)
    assert ranks == {"big": 2, "small": 0}


def test_parse_budget_units():
    costs = {"a": 100, "b": 300}
    assert parse_budget("2", costs) == 800 == parse_budget("2r", costs)
    assert parse_budget("0.5", costs) == 200
    assert parse_budget("1.5k", costs) == 1500
    assert parse_budget("120000params", costs) == 120000
    assert parse_budget("1MB", costs) == 250000
    assert parse_budget("1MiB", costs) == 2**18
    for bad in ("two", "-1", "0", "3 parsecs", "nan"):
        with pytest.raises(QDyLoRAError, match="budget"):
            parse_budget(bad, costs)
    with pytest.raises(QDyLoRAError, match="'1e400' is not a finite number"):  # was "must be positive"
        parse_budget("1e400", costs)


def test_allocation_records_are_checked():
    layers = ["x.q", "x.k"]
    a = allocation_from_record({"ranks": {"x.q": 2, "x.k": 0}, "name": "n"}, layers, 8, "f.json")
    assert a == Allocation.of({"x.q": 2, "x.k": 0}, "n") and a.rank_of("x.q") == 2 and hash(a)
    assert a.params({"x.q": 10, "x.k": 5}) == 20
    for bad in ({"ranks": {"x.q": 2}}, {"ranks": {"x.q": 2, "x.k": 9}}, {"ranks": {"x.q": 2, "x.k": "3"}},
                {"ranks": {"x.q": 2, "x.k": True}}, {"ranks": {"x.q": 1, "x.k": 1, "x.v": 1}}, {"r": {}}, [1]):
        with pytest.raises(QDyLoRAError, match="f.json"):
            allocation_from_record(bad, layers, 8, "f.json")
