"""p_B: the distribution a training step draws its rank from.

The rank of step t is a pure function of (seed, t), so a resumed run, or every process of a
distributed run, draws the same rank for the same step without sharing any RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..core.scaling import RankMixture
from ..errors import QDyLoRAError

RULES = ("full", "step", "example", "sandwich", "mixture")
DISTRIBUTIONS = ("uniform", "log-uniform")


@dataclass(frozen=True)
class RankSampler:
    """Uniform (or log-uniform: p(b) proportional to 1/b) over min_rank..max_rank, or an explicit
    list of ranks with optional weights."""

    max_rank: int
    min_rank: int = 1
    ranks: Optional[tuple[int, ...]] = None
    weights: Optional[tuple[float, ...]] = None
    seed: int = 0
    distribution: str = "uniform"

    def __post_init__(self) -> None:
        if not 1 <= self.min_rank <= self.max_rank:
            raise QDyLoRAError(
                f"min_rank {self.min_rank} and max_rank {self.max_rank}: need 1 <= min_rank <= max_rank"
            )
        if self.ranks is not None:
            if not self.ranks:
                raise QDyLoRAError("the list of ranks to sample is empty")
            check_ranks(self.ranks, self.max_rank, lowest=self.min_rank, what="sampled rank")
        if self.distribution not in DISTRIBUTIONS:
            raise QDyLoRAError(f"rank distribution must be one of {', '.join(DISTRIBUTIONS)}, "
                               f"got {self.distribution!r}")
        if self.weights is not None:
            if self.ranks is None or len(self.weights) != len(self.ranks):
                raise QDyLoRAError("rank weights need a list of ranks of the same length")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise QDyLoRAError("rank weights must be non-negative and not all zero")

    @property
    def support(self) -> list[int]:
        """The ranks that can be drawn."""
        return list(self.ranks) if self.ranks is not None else list(range(self.min_rank, self.max_rank + 1))

    def probabilities(self) -> list[float]:
        """p_B over `support`: the weights given, else uniform or proportional to 1/b."""
        support = self.support
        weights = self.weights
        if weights is None:
            weights = [1.0 / b for b in support] if self.distribution == "log-uniform" else [1.0] * len(support)
        total = sum(weights)
        return [w / total for w in weights]

    def rank_at(self, step: int) -> int:
        """The rank of optimizer step `step` (0-based); the same on every call and process."""
        # A fresh generator per step, seeded from (seed, step): no state to save or share.
        g = torch.Generator().manual_seed(_mix(self.seed, step))
        probs = torch.tensor(self.probabilities(), dtype=torch.float64)
        return self.support[int(torch.multinomial(probs, 1, generator=g))]

    def example_ranks(self, step: int, micro: int, n: int) -> list[int]:
        """Ranks of the n rows of micro-batch `micro` of step `step` (per-example rule): the
        smallest and the largest rank of the support, and n - 2 draws stratified over p_B (one
        from each of n - 2 slices of equal probability), in a random order over the rows. A pure
        function of (seed, step, micro, n), like `rank_at`."""
        if n == 1:
            return [self.rank_at(step)]
        g = torch.Generator().manual_seed(_mix(_mix(self.seed, step), micro))
        support = self.support
        cdf = torch.tensor(self.probabilities(), dtype=torch.float64).cumsum(0)
        m = n - 2
        u = (torch.arange(m, dtype=torch.float64) + torch.rand(m, generator=g, dtype=torch.float64)) / m
        drawn = [support[min(int(i), len(support) - 1)] for i in torch.searchsorted(cdf, u, right=True)]
        ranks = [support[0], support[-1]] + drawn
        return [ranks[int(i)] for i in torch.randperm(n, generator=g)]

    def mixture(self) -> RankMixture:
        """p_B as a `RankMixture`: the adapter averaged over the ranks it draws."""
        return RankMixture.of(dict(zip(self.support, self.probabilities())))


@dataclass(frozen=True)
class MicroBatchRanks:
    """What one micro-batch runs: `rows` index its examples (repeated when an example runs at
    several ranks) and `rank` is one rank or mixture for all rows, or one rank per row."""

    rows: list[int]
    rank: Union[int, list[int], RankMixture]


def micro_batch_ranks(rule: str, sampler: RankSampler, step: int, micro: int, n: int) -> MicroBatchRanks:
    """The ranks of micro-batch `micro` (of n examples) of optimizer step `step` under `rule`:

    step      one rank b ~ p_B for every micro-batch of the step (DyLoRA / QDyLoRA)
    example   each example its own rank: the smallest, the largest and n - 2 stratified draws
    sandwich  every example at the largest, the smallest and one drawn rank (3x the rows)
    mixture   the adapter averaged over p_B, E_b[s(b) B[:, :b] A[:b]], in one forward
    full      every example at the largest rank (plain LoRA; lower ranks by SVD ordering)
    """
    everyone = list(range(n))
    if rule == "step":
        return MicroBatchRanks(everyone, sampler.rank_at(step))
    if rule == "example":
        return MicroBatchRanks(everyone, sampler.example_ranks(step, micro, n))
    if rule == "sandwich":
        support = sampler.support
        ranks = [support[-1], support[0], sampler.rank_at(step)]
        return MicroBatchRanks(everyone * len(ranks), [r for r in ranks for _ in everyone])
    if rule == "mixture":
        return MicroBatchRanks(everyone, sampler.mixture())
    if rule == "full":
        return MicroBatchRanks(everyone, sampler.support[-1])
    raise QDyLoRAError(f"rank rule must be one of {', '.join(RULES)}, got {rule!r}")


def _mix(seed: int, step: int) -> int:
    """A 63-bit seed from (seed, step) (splitmix64), so nearby steps get unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def check_ranks(ranks: Sequence[int], max_rank: int, lowest: int = 1, what: str = "rank") -> None:
    """Refuse ranks outside lowest..max_rank in one line naming them all."""
    bad = [r for r in ranks if not lowest <= r <= max_rank]
    if bad:
        base = "; 0 = the base model" if lowest == 0 else ""
        raise QDyLoRAError(
            f"{what}{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} "
            f"{'are' if len(bad) > 1 else 'is'} outside {lowest}..{max_rank} (max_rank {max_rank}{base})"
        )


def parse_ranks(text: str) -> list[int]:
    """"1,2,4,8" or "1-64" or "1-8,16,32" -> sorted unique ranks."""
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        try:
            if part.lstrip("-").isdigit():  # one rank; "-1" is a (bad) rank, not a range
                out.add(int(part))
            elif "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise QDyLoRAError(
                f"cannot read ranks {text!r}: write them like 1,2,4,8 or 1-64"
            ) from None
    return sorted(out)


def step_rank_record(ranks: list) -> Union[int, str, list[int]]:
    """The ranks of a step as logged: one int (one rank for every row), "mixture", or every
    row's rank."""
    if any(isinstance(r, RankMixture) for r in ranks):
        return "mixture"
    rows = [b for r in ranks for b in (r if isinstance(r, list) else [r])]
    return rows[0] if len(set(rows)) == 1 else rows


def rank_fingerprint(rank) -> int:
    """An int that differs when a step's ranks differ, to check that every process agrees."""
    if isinstance(rank, int):
        return rank
    if isinstance(rank, str):
        return -1
    return sum((i + 1) * 1_000_003 * b for i, b in enumerate(rank)) % (2**31 - 1)
