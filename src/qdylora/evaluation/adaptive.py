"""Measuring ranks on rows in rounds, and spending rows only on the ranks still undecided.

A sweep exists for one decision: the smallest rank that is good enough (`confidence.decide`).
Most ranks are settled long before the last row: rank 1 is clearly worse, rank 64 is the best,
and only the ranks near the boundary need every row. `measure` takes the rows in a seeded random
order (so every prefix is a fair sample) and in rounds that double the rows measured so far;
after each round `open_entries` keeps only the entries some decision still depends on: the best,
the entries that may yet turn out best, and the smaller entries whose verdict is undecided. The
rest stop being measured; their values and intervals come from the rows they were measured on.
A quick mode also drops what no row count here could decide, for a cheaper first look.

Early verdicts are taken at a stricter confidence than the final one (`early_confidence`): a
verdict made on a fraction of the rows is then rarely one the full rows would reverse. An
exhaustive sweep is the same loop in one round with every entry, on the same row order, so the
two modes differ only in which (entry, row) cells they measure.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Mapping, Optional, Sequence

import torch

from .confidence import Decision

# (entries, row indices) -> {value: {entry: (len(rows), S) per-row statistics, in the rows' order}}
Score = Callable[[list, list[int]], dict[str, dict[Hashable, torch.Tensor]]]
Stats = dict[str, dict[Hashable, torch.Tensor]]

FIRST_FRACTION = 1 / 8  # the first round measures every entry on this share of the rows ...
FIRST_ROWS = 32  # ... and on at least this many
FUTILE = 4  # quick mode: an entry that would need more than this many times all the rows stops


def early_confidence(confidence: float) -> float:
    """The confidence of a verdict taken before the last round: the final error split over the
    looks (4 looks at most in practice: 1/8, 1/4, 1/2 of the rows and all)."""
    return 1 - (1 - confidence) / 4


def row_order(n: int, seed: int) -> list[int]:
    """The seeded order in which rows are measured (every prefix a uniform sample of the rows)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def round_sizes(n: int, first_fraction: float = FIRST_FRACTION, first_rows: int = FIRST_ROWS) -> list[int]:
    """Rows measured in each round: the first max(first_rows, n * first_fraction), then each
    round as many rows as all rounds before it (the rows measured so far double), up to n."""
    sizes, done = [], 0
    step = min(n, max(first_rows, math.ceil(n * first_fraction)))
    while done < n:
        sizes.append(min(step, n - done))
        done += sizes[-1]
        step = done
    return sizes


def measure(score: Score, entries: Sequence[Hashable], order: Sequence[int],
            judge: Optional[Callable[[Stats], list]] = None,
            on_round: Optional[Callable[[list[int], int], None]] = None,
            ) -> Stats:
    """Per-row statistics of every value at every entry, rows in `order`. Without `judge`: every
    entry on every row, in one round. With it: in `round_sizes` rounds, and after each round
    only the entries `judge(stats so far)` returns are measured further. `on_round(rows,
    entries)` is told each round's rows and number of entries before it runs (for a progress bar)."""
    sizes = [len(order)] if judge is None else round_sizes(len(order))
    parts: dict[str, dict[Hashable, list[torch.Tensor]]] = {}
    live, done = list(entries), 0
    for size in sizes:
        rows = list(order[done:done + size])
        if on_round is not None:
            on_round(rows, len(live))
        for value, by_entry in score(live, rows).items():
            for entry, stats in by_entry.items():
                parts.setdefault(value, {}).setdefault(entry, []).append(stats)
        done += size
        if judge is not None and done < len(order):
            live = judge(_joined(parts))
            if not live:
                break
    return _joined(parts)


def _joined(parts: dict[str, dict[Hashable, list[torch.Tensor]]]) -> Stats:
    return {v: {e: torch.cat(chunks) for e, chunks in by.items()} for v, by in parts.items()}


def open_entries(entries: Sequence[Hashable], decisions: Sequence[Decision], quick_rows: Optional[int] = None) -> list:
    """The entries some decision still depends on, in `entries` order; nothing when every
    decision is settled.

    By default: each decision's best and recommendation, its undecided smaller entries, the larger
    entries the recommendation is not shown within the tolerance of, and its contenders (entries
    not shown worse than the best at all: on more rows one of them may become the best, and every
    verdict is taken against the best). Keeping the contenders is what keeps the exhaustive
    sweep's decision (measured in docs/performance.md: without them the best was often settled
    on the first rows, and the recommendation differed in about half of the resamples).

    `quick_rows` (all the rows there are) asks for a quicker first look: no contenders, and an
    undecided entry that would need more than FUTILE times all the rows to be decided is dropped
    too, as all the rows would likely leave it undecided (a metric at chance otherwise costs every
    rank on every row). Cheaper, and a different pick from the exhaustive one more often."""
    keep: set = set()
    for d in decisions:
        open_ = {r: d.comparisons[r] for r in d.undecided} | {r: d.margins[r] for r in d.unshown}
        if quick_rows is None:
            live, rivals = list(open_), list(d.contenders)
        else:
            live = [r for r, c in open_.items() if c.rows_needed is None or c.rows_needed <= FUTILE * quick_rows]
            rivals = []
        if live or rivals:
            keep |= {d.best, d.recommended, *live, *rivals}
    return [e for e in entries if e in keep]


def judge_by(decide_all: Callable[[Stats], Sequence[Decision]], entries: Sequence[Hashable],
             quick_rows: Optional[int] = None) -> Callable[[Stats], list]:
    """A `measure` judge from a function that makes every decision of a sweep from its stats
    (`quick_rows`: see `open_entries`)."""
    return lambda stats: open_entries(entries, decide_all(stats), quick_rows)


def rows_measured(stats: Mapping[str, Mapping[Hashable, torch.Tensor]]) -> dict[str, dict[Hashable, int]]:
    """{value: {entry: rows it was measured on}}."""
    return {v: {e: int(s.shape[0]) for e, s in by.items()} for v, by in stats.items()}
