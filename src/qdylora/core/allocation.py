"""Per-layer ranks under a budget: which prefix of each layer's ordered adapter to keep.

An ordered adapter (`ordering.py`) keeps, in layer l at rank b, the first b components of its
delta D_l = c B A (c = alpha / sqrt(R), the "nested" scale: nothing is rescaled when it is cut).
Cutting layer l to b loses the tail E_l(b) = c B[:, b:] A[b:], and every criterion we use
measures that tail through two R x R Gram matrices of the layer, M (on B's side) and N (on A's):

    e_l(b) = c^2 sum_{i, j >= b} M_ij N_ij  =  c^2 tr(M[b:, b:] N[b:, b:])

    score    M                       N                        e_l(b) is
    svd      B^T B                   A A^T                    ||E||_F^2 (PARA's singular values)
    output   B^T B                   G = E_x[(A x)(A x)^T]    E_x ||E x||^2, the output error
    loss     P = E[(B^T g)(B^T g)^T] G                        tr(Fo E Fi E^T): the K-FAC estimate of
                                                              the loss increase (g: the loss gradient
                                                              at the layer's output)

(derivation: tr(Mo E Mi E^T) with E = c B_t A_t, B_t = B[:, b:], A_t = A[b:], is
c^2 tr((B_t^T Mo B_t)(A_t Mi A_t^T)), and B_t^T Mo B_t, A_t Mi A_t^T are the tail blocks of M, N).

The allocation is greedy across all layers: each component costs in_l + out_l parameters (a row
of A and a column of B) and gains the error it removes; within a layer the prefix order is kept
by walking the lower convex hull of e_l(b) (a run of components whose average gain beats the
first one alone is taken as one segment), so the greedy takes components in order of gain per
parameter and never skips one of its own layer. It stops when no further component fits: the
parameter count never exceeds the budget, and what is left is smaller than any layer's component.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..errors import QDyLoRAError

SCORES = ("svd", "output", "loss")
DEFAULT_SCORE = "svd"  # best or tied on every task of docs/rank-study.md, and needs no data
DEFAULT_CALIBRATION_ROWS = 64  # training rows the data-aware scores and orders are measured on


def tail_errors(M: torch.Tensor, N: torch.Tensor, c: float) -> torch.Tensor:
    """e(b) for b = 0..R (float64, shape (R+1,)): c^2 times the sum of M * N over [b:, b:]."""
    H = (M.double() * N.double()).flip(0, 1)  # (R, R), reversed so suffixes become prefixes
    S = H.cumsum(0).cumsum(1).flip(0, 1)  # S[b, b'] = sum over i >= b, j >= b' of M_ij N_ij
    tail = torch.diagonal(S)  # (R,): e(b) / c^2 for b = 0..R-1
    return c * c * torch.cat([tail, tail.new_zeros(1)])


@dataclass(frozen=True)
class Segment:
    """Components start+1..end of one layer, taken together: `gain` is what all of them remove."""

    layer: str
    start: int
    end: int
    gain: float


def hull_segments(layer: str, errors: torch.Tensor) -> list[Segment]:
    """The lower convex hull of the points (b, e(b)), b = 0..R, as segments of decreasing gain
    per component (the greedy's units for one layer)."""
    e = [float(v) for v in errors]
    hull = [0]
    for b in range(1, len(e)):
        # drop the last vertex while it lies on or above the chord from the one before it to b
        while len(hull) >= 2:
            a, m = hull[-2], hull[-1]
            if (e[m] - e[a]) * (b - a) >= (e[b] - e[a]) * (m - a):
                hull.pop()
            else:
                break
        hull.append(b)
    return [Segment(layer, a, b, e[a] - e[b]) for a, b in zip(hull, hull[1:])]


def allocate(errors: Mapping[str, torch.Tensor], costs: Mapping[str, int], budget: int) -> dict[str, int]:
    """Per-layer ranks with the least total error whose parameters (sum of rank * cost) fit in
    `budget`: greedy by gain per parameter over every layer's hull segments (see module doc)."""
    if budget < 0:
        raise QDyLoRAError(f"the budget must not be negative, got {budget}")
    segments = [s for layer, e in errors.items() for s in hull_segments(layer, e)]
    order = {layer: i for i, layer in enumerate(errors)}  # ties: model order, deterministic
    segments.sort(key=lambda s: (-s.gain / ((s.end - s.start) * costs[s.layer]), order[s.layer], s.start))
    ranks = {layer: 0 for layer in errors}
    left = budget
    for s in segments:
        if ranks[s.layer] != s.start:  # an earlier segment of this layer did not fit whole
            continue
        n = min(s.end - s.start, left // costs[s.layer])
        ranks[s.layer] += n
        left -= n * costs[s.layer]
    return ranks


@dataclass(frozen=True)
class Allocation:
    """Per-layer ranks of one adapter (module path -> rank in 0..R; 0 = that layer's adapter off).

    Hashable, so a sweep can key results by it as by an int rank; `name` labels it in tables."""

    ranks: tuple[tuple[str, int], ...]
    name: str = ""
    _lookup: dict = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        self._lookup.update(self.ranks)

    @classmethod
    def of(cls, ranks: Mapping[str, int], name: str = "") -> "Allocation":
        return cls(tuple((str(p), int(r)) for p, r in ranks.items()), name)

    def as_dict(self) -> dict[str, int]:
        return dict(self.ranks)

    def rank_of(self, path: str) -> int:
        return self._lookup[path]

    @property
    def max_rank(self) -> int:
        return max((r for _, r in self.ranks), default=0)

    def params(self, costs: Mapping[str, int]) -> int:
        return sum(r * costs[p] for p, r in self.ranks)

    def mean_rank(self, costs: Mapping[str, int]) -> float:
        """The uniform rank with the same parameter count."""
        return self.params(costs) / sum(costs.values())

    def __str__(self) -> str:
        return self.name or f"allocation of {len(self.ranks)} layers"


def layer_costs(model) -> dict[str, int]:
    """Parameters of one component of each adapted layer of a QDyLoRAModel: a row of A (in) and a
    column of B (out)."""
    return {p: layer.in_features + layer.out_features for p, layer in model.adapter_layers().items()}


def layer_rank(rank: "int | Allocation", path: str) -> int:
    """The rank layer `path` runs at under a uniform rank or an allocation."""
    return rank.rank_of(path) if isinstance(rank, Allocation) else rank


BYTES_PER_PARAM = 4  # the adapter's tensors are saved in float32 (run files and PEFT exports)
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(|r|rank|k|m|g|params?|kb|mb|gb|kib|mib|gib)\s*$",
                     re.IGNORECASE)
_UNITS = {"k": 1e3, "m": 1e6, "g": 1e9, "param": 1, "params": 1,
          "kb": 1e3 / BYTES_PER_PARAM, "mb": 1e6 / BYTES_PER_PARAM, "gb": 1e9 / BYTES_PER_PARAM,
          "kib": 2**10 / BYTES_PER_PARAM, "mib": 2**20 / BYTES_PER_PARAM, "gib": 2**30 / BYTES_PER_PARAM}


def parse_budget(text: str, costs: Mapping[str, int]) -> int:
    """A budget in parameters from "2" / "2r" (the parameter count of uniform rank 2), "1.5M" /
    "300k" / "120000params" (parameters) or "4MB" / "4MiB" (float32 adapter bytes)."""
    m = _BUDGET.match(str(text))
    if not m:
        raise QDyLoRAError(f"cannot read the budget {text!r}: use an average rank (2, 0.5r), a parameter "
                           "count (1.5M, 300k, 120000params) or a size (4MB, 4MiB)")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value):
        raise QDyLoRAError(f"the budget {text!r} is not a finite number: give an average rank (2), a parameter "
                           "count (1.5M) or a size (4MB)")
    if value <= 0:
        raise QDyLoRAError(f"the budget must be positive, got {text!r}")
    if unit in ("", "r", "rank"):
        return int(value * sum(costs.values()))
    return int(value * _UNITS[unit])


def budget_label(text: str) -> str:
    """A budget as a file-name-safe label ("2" -> "r2", "1.5M" -> "1.5M")."""
    m = _BUDGET.match(str(text))
    unit = m.group(2) if m else ""
    value = m.group(1) if m else str(text)
    return f"r{value}" if unit.lower() in ("", "r", "rank") else f"{value}{unit}"


def allocation_record(allocation: Allocation, costs: Mapping[str, int], **about) -> dict:
    """What an allocation file holds: the ranks and how they were chosen (`about`)."""
    return {"name": allocation.name, **about, "params": allocation.params(costs),
            "mean_rank": allocation.mean_rank(costs), "ranks": allocation.as_dict()}


def allocation_from_record(record: dict, layers: Sequence[str], max_rank: int, where: str) -> Allocation:
    """An allocation file's ranks, checked against the model's adapted layers."""
    ranks = record.get("ranks") if isinstance(record, dict) else None
    if not isinstance(ranks, dict):
        raise QDyLoRAError(f"{where} is not an allocation file (no 'ranks' object)")
    missing = [p for p in layers if p not in ranks]
    extra = [p for p in ranks if p not in set(layers)]
    if missing or extra:
        raise QDyLoRAError(f"{where} does not fit this run's layers ({len(missing)} missing, {len(extra)} unknown, "
                           f"e.g. {(missing or extra)[0]!r}): allocate again for this run")
    for p, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= max_rank:
            raise QDyLoRAError(f"{where}: the rank of {p} must be an integer in 0..{max_rank}, got {json.dumps(r)}")
    return Allocation.of({p: ranks[p] for p in layers}, str(record.get("name", "")))
