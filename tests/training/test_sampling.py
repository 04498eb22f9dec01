"""p_B: deterministic per step, the right distribution, validated."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from qdylora import QDyLoRAError
from qdylora.core.scaling import RankMixture
from qdylora.training.sampling import RankSampler, micro_batch_ranks, parse_ranks


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


def test_example_ranks_hold_both_ends_and_a_stratified_rest():
    sampler = RankSampler(64, seed=5)
    for step in range(40):
        ranks = sampler.example_ranks(step, 0, 8)
        assert len(ranks) == 8 and 1 in ranks and 64 in ranks
        rest = sorted(ranks)
        rest.remove(1), rest.remove(64)
        # draw j is rank 1 + floor(64 u) with u in [j/6, (j+1)/6): one draw from each sixth of
        # p_B, so the j-th smallest rank's probability interval [(r-1)/64, r/64) meets slice j
        assert all((r - 1) / 64 < (j + 1) / 6 and r / 64 > j / 6 for j, r in enumerate(rest)), rest
    assert sampler.example_ranks(3, 1, 8) == RankSampler(64, seed=5).example_ranks(3, 1, 8)  # pure
    assert sampler.example_ranks(3, 1, 8) != sampler.example_ranks(3, 2, 8)  # micro-batches differ
    assert sampler.example_ranks(7, 0, 1) == [sampler.rank_at(7)]  # one row: p_B itself


def test_example_ranks_follow_p_b_over_many_steps():
    """Apart from the two fixed ends, the rows' ranks are distributed as p_B."""
    sampler = RankSampler(16, ranks=(1, 4, 16), weights=(0.5, 0.25, 0.25), seed=0)
    counts = Counter(r for t in range(500) for r in sampler.example_ranks(t, 0, 10)[0:10])
    n = 500 * 8  # stratified draws; plus one 1 and one 16 per micro-batch
    assert abs(counts[1] - 500 - 0.5 * n) < 0.05 * n and abs(counts[4] - 0.25 * n) < 0.05 * n


def test_log_uniform_distribution():
    sampler = RankSampler(64, distribution="log-uniform")
    p = dict(zip(sampler.support, sampler.probabilities()))
    assert p[1] == pytest.approx(64 * p[64]) and sum(p.values()) == pytest.approx(1.0)
    assert sum(p[b] for b in range(1, 9)) > 0.5  # as much weight below 8 as a uniform p_B puts below 33
    with pytest.raises(QDyLoRAError, match="rank distribution must be one of"):
        RankSampler(64, distribution="zipf")


def test_micro_batch_ranks_of_each_rule():
    sampler = RankSampler(8, seed=2)
    step = micro_batch_ranks("step", sampler, 4, 1, 3)
    assert step.rows == [0, 1, 2] and step.rank == sampler.rank_at(4)
    example = micro_batch_ranks("example", sampler, 4, 1, 3)
    assert example.rows == [0, 1, 2] and example.rank == sampler.example_ranks(4, 1, 3)
    sandwich = micro_batch_ranks("sandwich", sampler, 4, 1, 2)
    assert sandwich.rows == [0, 1] * 3 and sandwich.rank == [8, 8, 1, 1, sampler.rank_at(4), sampler.rank_at(4)]
    mixture = micro_batch_ranks("mixture", sampler, 4, 1, 2)
    assert mixture.rows == [0, 1] and mixture.rank == RankMixture.of({b: 1.0 for b in range(1, 9)})
    with pytest.raises(QDyLoRAError, match="rank rule must be one of"):
        micro_batch_ranks("random", sampler, 0, 0, 2)
