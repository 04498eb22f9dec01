"""Rank gains: one factor g(b) per rank b that multiplies the adapter's scale s(b).

An SVD-ordered adapter (`core.ordering`) used at rank b keeps the b largest components of each
layer's trained delta, unscaled. They were trained beside the other R - b components, which
carried part of the change the run learned; cut alone, the kept ones do better when made larger.
On Qwen2.5-0.5B (ASDiv, a rank-64 run at alpha / 64, docs/rank-study.md) the answer loss at rank
1 on 64 training rows fell from 0.716 to 0.671 with g(1) = 2, and on the 200 test rows from
0.749 to 0.689 (a rank-1 QLoRA run: 0.669).

The gains are part of the adapter (its file keeps them beside A and B): g(1..R), g(R) = 1 when
fitted (the full rank is the trained delta). `training.gains` fits them on calibration rows at
the powers of two below R; `gain_table` fills the ranks between.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from ..errors import QDyLoRAError
from .model import QDyLoRAModel


def gain_table(fitted: Mapping[int, float], max_rank: int) -> tuple[float, ...]:
    """g(1..max_rank) from gains fitted at some ranks (g(max_rank) = 1 unless given): linear in
    log g against log b between fitted ranks, constant below the smallest."""
    points = sorted({**{max_rank: 1.0}, **{int(b): float(g) for b, g in fitted.items()}}.items())
    for b, g in points:
        if not 1 <= b <= max_rank or not (math.isfinite(g) and g > 0):
            raise QDyLoRAError(f"a rank gain must be positive and finite at a rank in 1..{max_rank}, got g({b}) = {g}")
    table = []
    for b in range(1, max_rank + 1):
        if b <= points[0][0]:
            table.append(points[0][1])
            continue
        (b0, g0), (b1, g1) = next((p, q) for p, q in zip(points, points[1:]) if p[0] < b <= q[0])
        t = (math.log(b) - math.log(b0)) / (math.log(b1) - math.log(b0))  # 0 at b0, 1 at b1
        table.append(math.exp((1 - t) * math.log(g0) + t * math.log(g1)))
    return tuple(table)


def check_gains(gains: Sequence[float], max_rank: int, where: str) -> tuple[float, ...]:
    """`gains` as a tuple of max_rank positive finite floats, or a one-line error naming `where`."""
    if not isinstance(gains, (list, tuple)) or len(gains) != max_rank:
        raise QDyLoRAError(f"{where}: rank gains must be a list of {max_rank} numbers (one per rank)")
    if not all(isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) and g > 0 for g in gains):
        raise QDyLoRAError(f"{where}: every rank gain must be a positive finite number")
    return tuple(float(g) for g in gains)


def set_rank_gains(model: QDyLoRAModel, gains: Optional[Sequence[float]]) -> None:
    """Every adapter's scale at rank b is multiplied by gains[b - 1] (None: by 1)."""
    R = model.qdylora_config.max_rank
    value = None if gains is None else check_gains(list(gains), R, "set_rank_gains")
    for layer in model.adapter_layers().values():
        layer.rank_gains = value


def rank_gains(model: QDyLoRAModel) -> Optional[tuple[float, ...]]:
    """The model's g(1..R), or None (every gain 1)."""
    layers = list(model.adapter_layers().values())
    return layers[0].rank_gains if layers else None
