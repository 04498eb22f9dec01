"""s(b), the scale of the adapter at rank b: the one home of the formula, for one rank, for a
tensor of per-example ranks, and for a mixture of ranks (the component weights of a training
forward that averages the adapter over p_B).

    standard  s(b) = alpha / b         (LoRA, DyLoRA, QDyLoRA)
    rslora    s(b) = alpha / sqrt(b)   (rsLoRA)
    nested    s(b) = alpha / sqrt(R)   for every b: rank b is exactly the first b components of
                                       the rank-R adapter, nothing rescaled when it is cut

Each rule's s(b) may be multiplied by a gain g(b) of the adapter (`core.gains`: fitted after an
SVD-ordered run, so that a few kept components make up for the ones cut away); `gains` is then
the sequence g(1..R), and None means g = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

RULES = ("standard", "rslora", "nested")


def scale(alpha: float, rank: int, rule: str, max_rank: int, gains: Optional[Sequence[float]] = None) -> float:
    """g(b) s(b) under `rule` for an adapter of `max_rank` components (g = 1 without `gains`);
    0 for rank 0 (adapter off)."""
    if rank == 0:
        return 0.0
    gain = gains[rank - 1] if gains is not None else 1.0
    if rule == "nested":
        return gain * alpha / max_rank**0.5
    return gain * (alpha / rank if rule == "standard" else alpha / rank**0.5)


def scales(alpha: float, ranks: torch.Tensor, rule: str, max_rank: int,
           gains: Optional[Sequence[float]] = None) -> torch.Tensor:
    """g(b_i) s(b_i) for a tensor of ranks, float32 of the same shape; 0 where the rank is 0."""
    r = ranks.to(torch.float32)
    if rule == "nested":
        s = torch.full_like(r, alpha / max_rank**0.5)
    else:
        s = alpha / (r if rule == "standard" else r.sqrt())
    if gains is not None:
        table = torch.tensor([1.0, *gains], dtype=torch.float32, device=ranks.device)  # (R + 1,): g(0..R)
        s = s * table[ranks.long()]
    return torch.where(ranks > 0, s, torch.zeros_like(s))


@dataclass(frozen=True)
class RankMixture:
    """The adapter averaged over ranks drawn with `probabilities` {rank: p}:

        E_b[s(b) B[:, :b] A[:b]] = B diag(c) A,    c_k = sum_{b > k} p(b) s(b)   (k = 0..max-1)

    one forward at the largest rank instead of one per rank (MatryoshkaLoRA's training forward,
    arXiv 2605.07850, normalised to an expectation so the output keeps a single rank's size).
    """

    probabilities: tuple[tuple[int, float], ...]

    @classmethod
    def of(cls, probabilities: dict[int, float]) -> "RankMixture":
        total = sum(probabilities.values())
        return cls(tuple(sorted((int(b), p / total) for b, p in probabilities.items() if p > 0)))

    @property
    def max_rank(self) -> int:
        return self.probabilities[-1][0]

    def component_weights(self, alpha: float, rule: str, adapter_rank: int) -> torch.Tensor:
        """c, float64 of shape (max_rank,), for an adapter of `adapter_rank` components."""
        c = torch.zeros(self.max_rank, dtype=torch.float64)
        for b, p in self.probabilities:
            c[:b] += p * scale(alpha, b, rule, adapter_rank)
        return c
