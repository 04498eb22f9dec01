"""p_B: deterministic per step, the right distribution, validated."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from qdylora import QDyLoRAError
from qdylora.sampling import RankSampler, parse_ranks


def test_rank_is_a_function_of_seed_and_step():
    a, b = RankSampler(64, seed=3), RankSampler(64, seed=3)
    forward = [a.rank_at(t) for t in range(50)]
    backward = {t: b.rank_at(t) for t in reversed(range(50))}  # call order does not matter
    assert forward == [backward[t] for t in range(50)]
    assert [a.rank_at(t) for t in range(50)] != [RankSampler(64, seed=4).rank_at(t) for t in range(50)]


def _chi2(sampler, n=6000):
    counts = Counter(sampler.rank_at(t) for t in range(n))
    assert set(counts) <= set(sampler.support)
    probs = dict(zip(sampler.support, sampler.probabilities()))
    return sum((counts.get(r, 0) - n * p) ** 2 / (n * p) for r, p in probs.items() if p > 0), counts


def test_uniform_over_the_range():
    sampler = RankSampler(16, min_rank=3, seed=0)
    chi2, counts = _chi2(sampler)
    dof = len(sampler.support) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof)  # far above the 99.9% point would mean a bias
    assert set(counts) == set(range(3, 17))


def test_weighted_list():
    sampler = RankSampler(64, ranks=(1, 8, 64), weights=(0.7, 0.2, 0.1), seed=1)
    chi2, counts = _chi2(sampler)
    assert chi2 < 2 + 5 * 2
    assert counts[1] > counts[8] > counts[64]


def test_zero_weight_is_never_drawn():
    sampler = RankSampler(8, ranks=(2, 4), weights=(1.0, 0.0))
    assert {sampler.rank_at(t) for t in range(200)} == {2}


def test_powers_of_two():
    assert RankSampler.powers_of_two(64).support == [1, 2, 4, 8, 16, 32, 64]
    assert RankSampler.powers_of_two(48, min_rank=4).support == [4, 8, 16, 32]


def test_min_equals_max_is_fixed_rank_lora():
    assert {RankSampler(8, min_rank=8).rank_at(t) for t in range(100)} == {8}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_rank=8, min_rank=9), "min_rank 9"),
        (dict(max_rank=8, min_rank=0), "min_rank 0"),
        (dict(max_rank=8, ranks=(1, 9)), "rank 9"),
        (dict(max_rank=8, ranks=()), "empty"),
        (dict(max_rank=8, ranks=(1, 2), weights=(1.0,)), "same length"),
        (dict(max_rank=8, ranks=(1, 2), weights=(0.0, 0.0)), "not all zero"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(QDyLoRAError, match=message):
        RankSampler(**kwargs)


def test_parse_ranks():
    assert parse_ranks("1,2,4,8") == [1, 2, 4, 8]
    assert parse_ranks("1-4, 16,2") == [1, 2, 3, 4, 16]
    for bad in ["", "a", "4-1", "1,,2"]:
        with pytest.raises(QDyLoRAError, match="cannot read ranks"):
            parse_ranks(bad)
