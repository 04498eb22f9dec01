"""Fit the rank gains g(b) of an SVD-ordered adapter on calibration rows (`core.gains`).

At each power of two b below the largest rank, g(b) is the gain of a small grid (and the vertex
of a parabola through the best grid point and its neighbours, in log g) with the lowest answer
loss at rank b on the rows; g = 1 is on the grid, so a fitted gain never raises the loss on the
rows it was fitted on. All fitted ranks are measured in one rank-batched pass per candidate
(per-example ranks: rank b's rows use g(b)), so a fit costs 7 forward passes of the rows at each
of the ranks: 32 rows of Qwen2.5-0.5B at its 6 fitted ranks took 156 s on a 2-core Xeon (bf16),
against 2.7 s for one training step of 8 rows (docs/rank-study.md, fifth study).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..core.gains import gain_table, set_rank_gains
from ..core.model import QDyLoRAModel
from ..core.rank import evaluating
from .losses import batch_losses_at_ranks

GRID = (0.71, 1.0, 1.41, 2.0, 2.83, 4.0)  # candidate gains: steps of sqrt(2), 1 included


@dataclass
class GainFit:
    """The fitted gain of each rank, with the calibration loss at g = 1 and at the gain."""

    gains: dict[int, float]
    loss_at_one: dict[int, float]
    loss: dict[int, float]
    rows: int

    def to_dict(self) -> dict:
        return {"rows": self.rows, **{str(b): {"gain": round(g, 4), "loss_at_gain_1": round(self.loss_at_one[b], 5),
                                               "loss": round(self.loss[b], 5)} for b, g in self.gains.items()}}


def fitted_ranks(max_rank: int) -> list[int]:
    """The ranks whose gains are fitted: the powers of two below max_rank."""
    return [1 << k for k in range(max(max_rank - 1, 0).bit_length()) if 1 << k < max_rank]


def _losses(model: QDyLoRAModel, batches: Sequence[dict[str, torch.Tensor]], candidate: dict[int, float],
            autocast: Callable) -> dict[int, float]:
    """Mean answer loss at each rank of `candidate` with its gain, in one rank-batched pass."""
    R = model.qdylora_config.max_rank
    set_rank_gains(model, gain_table(candidate, R))
    sums = batch_losses_at_ranks(model, batches, list(candidate), autocast=autocast)
    return {b: float(s.sum()) / max(int(c.sum()), 1) for b, (s, c) in sums.items()}


def _vertex(points: dict[float, float], best: float) -> float | None:
    """The minimum of the parabola in log g through `best` and its grid neighbours, if interior."""
    grid = sorted(points)
    i = grid.index(best)
    if i == 0 or i == len(grid) - 1:
        return None
    (x0, x1, x2), (y0, y1, y2) = [math.log(g) for g in grid[i - 1:i + 2]], [points[g] for g in grid[i - 1:i + 2]]
    denominator = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denominator
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denominator
    return math.exp(-b / (2 * a)) if a > 0 else None


def fit_rank_gains(model: QDyLoRAModel, batches: Sequence[dict[str, torch.Tensor]],
                   autocast: Callable) -> GainFit:
    """Fit g(b) at `fitted_ranks` on padded `batches` (`calibration.calibration_batches`) and set
    the model's gain table (`core.gains.gain_table`). The model's rank and mode are kept."""
    R = model.qdylora_config.max_rank
    ranks = fitted_ranks(R)
    if not ranks:
        set_rank_gains(model, None)
        return GainFit({}, {}, {}, 0)
    seen: dict[int, dict[float, float]] = {b: {} for b in ranks}
    with evaluating(model):
        for g in GRID:
            for b, loss in _losses(model, batches, {b: g for b in ranks}, autocast).items():
                seen[b][g] = loss
        vertices = {b: _vertex(seen[b], min(seen[b], key=seen[b].get)) for b in ranks}
        refine = {b: v for b, v in vertices.items() if v is not None}
        if refine:
            for b, loss in _losses(model, batches, refine, autocast).items():
                seen[b][refine[b]] = loss
    gains = {b: min(seen[b], key=seen[b].get) for b in ranks}
    set_rank_gains(model, gain_table(gains, R))
    rows = sum(int(batch["input_ids"].shape[0]) for batch in batches)
    return GainFit(gains, {b: seen[b][1.0] for b in ranks}, {b: seen[b][gains[b]] for b in ranks}, rows)
