"""How sure a sweep is: intervals over rows, paired comparisons with the best rank, and the smallest
rank that is good enough at a stated confidence.

Every metric is a function of per-row statistics summed over rows, `value = reduce(stats.sum(0))`
for `stats` of shape (n, S): the token loss is (summed token loss, tokens) -> s0 / s1, exact match
(100 * hit, 1) -> s0 / s1, corpus BLEU sacrebleu's n-gram counts -> its formula. That one form
lets a single resampling serve every metric: a bootstrap draw is a vector of row counts w (n,),
and the metric on it is reduce(w @ stats). Ranks are measured on the same rows, so drawing the
same w for two ranks gives the paired comparison, which is far tighter than two separate
intervals (adapters at neighbouring ranks err on mostly the same rows).

The decision is a non-inferiority test: rank b is *good enough* when, at `confidence`, it is
worse than the best rank by at most `tolerance` (in the metric's own units): the one-sided
upper bound of its deficit is <= tolerance. It is *worse* when the lower bound exceeds the
tolerance, else *undecided*, and then more rows would tell: the bound's width shrinks as
1/sqrt(rows), which gives the rows needed. Draws are seeded: a sweep is reproducible.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Optional

import torch

DEFAULT_CONFIDENCE = 0.95
DEFAULT_DRAWS = 2000  # bootstrap resamples; percentiles of 2000 draws move by ~0.3 % of the width
DEFAULT_SEED = 0
MIN_ROWS = 2  # fewer rows have no spread to resample: every comparison on them is undecided
GOOD, WORSE, UNDECIDED = "good enough", "worse", "undecided"

Reduce = Callable[[torch.Tensor], torch.Tensor]  # summed stats (..., S) -> metric (...)


def ratio(scale: float = 1.0) -> Reduce:
    """scale * s0 / s1: a mean over rows (stats (value, 1)) or over tokens (stats (sum, count))."""
    return lambda s: scale * s[..., 0] / s[..., 1]


def exp_ratio(s: torch.Tensor) -> torch.Tensor:
    """exp(s0 / s1): perplexity from (summed token loss, tokens), capped as the sweep caps it."""
    return torch.exp((s[..., 0] / s[..., 1]).clamp(max=50.0))


def resample_counts(n: int, draws: int, seed: int) -> torch.Tensor:
    """(draws, n) float64: how often each of n rows appears in each bootstrap resample of n rows."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(n, (draws, n), generator=g)  # (D, n) row indices
    return torch.zeros(draws, n, dtype=torch.float64).scatter_add_(1, picks, torch.ones(draws, n, dtype=torch.float64))


def wilson(successes: float, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval (two-sided) of a proportion: successes of n 0/1 rows. A bootstrap
    of rows that are all 0 (or all 1) has zero width; this one is [0, z^2 / (n + z^2)] there
    (0 of 32 rows at 95 %: [0, 10.7 %])."""
    if n == 0:
        return math.nan, math.nan
    z = statistics.NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes <= 0 else max(0.0, center - half)  # exactly 0 (1) there, not 1e-15 off
    high = 1.0 if successes >= n else min(1.0, center + half)
    return low, high


def is_binary(stats: torch.Tensor) -> bool:
    """True if (n, 2) per-row stats are 0/1 scores of weight 1 (exact match, accuracy)."""
    return (stats.shape[1] == 2 and bool(((stats[:, 0] == 0) | (stats[:, 0] == 1)).all())
            and bool((stats[:, 1] == 1).all()))


def _quantile(x: torch.Tensor, q: float) -> float:
    finite = x[torch.isfinite(x)]
    return float(torch.quantile(finite, q)) if finite.numel() else math.nan


@dataclass(frozen=True)
class Bootstrap:
    """Seeded resampling of rows, shared by every rank and metric of a sweep (the same rows drawn
    for every rank: paired)."""

    confidence: float = DEFAULT_CONFIDENCE
    draws: int = DEFAULT_DRAWS
    seed: int = DEFAULT_SEED
    _counts: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")

    def counts(self, n: int) -> torch.Tensor:
        """(draws, n) resample counts of the first n rows (made once per n)."""
        if n not in self._counts:
            self._counts[n] = resample_counts(n, self.draws, self.seed + n)
        return self._counts[n]

    def values(self, stats: torch.Tensor, reduce: Reduce) -> torch.Tensor:
        """(draws,) the metric on each resample of `stats` (n, S)."""
        return reduce(self.counts(stats.shape[0]) @ stats.double())

    def interval(self, stats: torch.Tensor, reduce: Reduce) -> tuple[float, float]:
        """Two-sided percentile interval of the metric at `confidence` (unknown on fewer than
        MIN_ROWS rows: one row resampled is itself, a zero-width interval)."""
        if stats.shape[0] < MIN_ROWS:
            return math.nan, math.nan
        v, tail = self.values(stats, reduce), (1 - self.confidence) / 2
        return _quantile(v, tail), _quantile(v, 1 - tail)


@dataclass(frozen=True)
class Comparison:
    """One entry against the best: `difference` = its value minus the best's (the metric's units),
    `interval` its two-sided interval, `deficit_bounds` the one-sided bounds (at the confidence)
    of how much worse it is, on the `rows` both were measured on; `verdict` GOOD / WORSE /
    UNDECIDED against the tolerance, and for UNDECIDED the rows that would likely decide."""

    difference: float
    interval: tuple[float, float]
    deficit_bounds: tuple[float, float]
    verdict: str
    rows: int
    rows_needed: Optional[int] = None

    def to_dict(self) -> dict:
        out = {"difference": self.difference, "interval": list(self.interval), "verdict": self.verdict,
               "rows": self.rows}
        return out | ({"rows_needed": self.rows_needed} if self.rows_needed is not None else {})


def compare(stats: torch.Tensor, best: torch.Tensor, reduce: Reduce, higher_is_better: bool, tolerance: float,
            boot: Bootstrap, scores: bool = False) -> Comparison:
    """Paired comparison of an entry's per-row stats with the best's, on the rows both have (the
    first min(n, n_best): rows are measured in one fixed order).

    `scores`: the stats are per-row scores in [0, 1] with weight 1 (exact match, accuracy). Two
    entries that agree on every row (no discordant row: common with 0/1 scores on few rows) have
    a bootstrap interval of zero width, a certainty the rows do not give (EM 0 % at every rank on
    32 rows said "good enough" for rank 1). So the resamples also see one row the entry loses and
    one it wins (Agresti and Min's add-one for paired proportions): the estimate is unchanged, the
    interval is about +-3/n wider where nothing disagrees and barely moves where much does."""
    m = min(stats.shape[0], best.shape[0])
    a, b = stats[:m].double(), best[:m].double()
    diff = float(reduce(a.sum(0)) - reduce(b.sum(0)))
    if m < MIN_ROWS:  # a resample of one row is that row: a zero-width interval, not a certainty
        return Comparison(diff, (math.nan, math.nan), (math.nan, math.nan), UNDECIDED, m)
    if scores:
        one = torch.ones(2, dtype=torch.float64)
        a = torch.cat([a, torch.stack([torch.tensor([0.0, 1.0]), one]).double()])  # (m+2, 2): loses one, wins one
        b = torch.cat([b, torch.stack([one, torch.tensor([0.0, 1.0])]).double()])
    draws = boot.values(a, reduce) - boot.values(b, reduce)  # (D,) paired: the same rows for both
    sign = -1.0 if higher_is_better else 1.0  # deficit = how much worse, in the metric's units
    deficit, deficits = sign * diff, sign * draws
    alpha, tail = 1 - boot.confidence, (1 - boot.confidence) / 2
    low, high = _quantile(deficits, alpha), _quantile(deficits, 1 - alpha)  # one-sided bounds
    interval = (_quantile(draws, tail), _quantile(draws, 1 - tail))
    return judged(diff, interval, deficit, (low, high), tolerance, m)


def judged(diff: float, interval: tuple[float, float], deficit: float, bounds: tuple[float, float],
           tolerance: float, rows: int) -> Comparison:
    """The verdict of a comparison from the one-sided bounds of its deficit: good enough when the
    upper bound is within the tolerance, worse when the lower one is beyond it, else undecided
    (with the rows that would likely decide it; None where `rows` is unknown, 0)."""
    low, high = bounds
    if math.isnan(high):
        return Comparison(diff, interval, bounds, UNDECIDED, rows)
    if high <= tolerance:
        return Comparison(diff, interval, bounds, GOOD, rows)
    if low > tolerance:
        return Comparison(diff, interval, bounds, WORSE, rows)
    return Comparison(diff, interval, bounds, UNDECIDED, rows,
                      rows_needed(rows, deficit, bounds, tolerance) if rows else None)


def rows_needed(rows: int, deficit: float, bounds: tuple[float, float], tolerance: float, cap: int = 100) -> int:
    """Rows at which the one-sided bound on the side of the tolerance would likely clear it: the
    bound's distance from the estimate shrinks as 1/sqrt(rows). At most `cap` times `rows`."""
    low, high = bounds
    spread = (high - deficit) if deficit <= tolerance else (deficit - low)
    gap = abs(tolerance - deficit)
    if gap <= 0 or spread <= 0:
        return rows * cap
    return min(rows * cap, math.ceil(round(rows * (spread / gap) ** 2, 6)))  # round: no 25.000000001 -> 26


@dataclass(frozen=True)
class Decision:
    """The recommendation for one metric: the smallest entry shown good enough (by rank, or by
    parameters with `size`), the best by point estimate, every entry's comparison with it, the
    smaller entries the rows could not decide, and the recommendation's own comparison with each
    larger entry not shown worse than the best (`margins`: the point-best is one estimate, and a
    larger entry may truly be better by more than the tolerance)."""

    metric: str
    recommended: Hashable
    best: Hashable
    tolerance: float
    confidence: float
    comparisons: dict
    undecided: list
    contenders: list = field(default_factory=list)  # candidates not shown worse than the best at all
    margins: dict = field(default_factory=dict)  # {larger entry: the recommendation compared with it}

    @property
    def unshown(self) -> list:
        """Larger entries the recommendation is not shown within the tolerance of."""
        return [r for r, c in self.margins.items() if c.verdict != GOOD]

    @property
    def sure(self) -> bool:
        """True when the recommendation is shown within the tolerance of every larger entry that may
        be better, and no smaller entry may still be good enough."""
        return not self.undecided and not self.unshown

    def message(self, name=str) -> str:
        """One line: what is recommended, how sure, and what more rows would settle."""
        rec, best, tol = name(self.recommended), name(self.best), f"{self.tolerance:g}"
        if self.sure:
            return (f"{self.metric}: rank {rec} is the smallest within {tol} of every larger rank (the best: rank "
                    f"{best}) at {self.confidence:.0%} confidence")
        open_ = [self.margins[r] for r in self.unshown] + [self.comparisons[r] for r in self.undecided]
        rows = min(c.rows for c in open_)
        needed = max((c.rows_needed or 0) for c in open_)
        more = f"about {needed:,} rows would tell" if needed > rows > 0 else "more rows would tell"
        rows = f"{rows}" if rows else "measured"  # 0: a count the source did not give (lm-eval)
        if all(c.verdict != WORSE for r, c in self.comparisons.items() if r != 0):
            return (f"{self.metric}: the {rows} rows cannot tell the ranks apart (none is surely worse than the "
                    f"best, rank {best}, by more than {tol}): rank {rec} is a guess, not a decision; {more}")
        parts = []
        if self.unshown:
            parts.append(f"do not show it within {tol} of rank {', '.join(name(r) for r in self.unshown)}")
        if self.undecided:
            parts.append(f"cannot tell whether rank {', '.join(name(r) for r in self.undecided)} is good enough too")
        what = "the best measured" if self.recommended == self.best else f"within {tol} of the best (rank {best})"
        return (f"{self.metric}: rank {rec} is {what}, but at {self.confidence:.0%} confidence the {rows} rows "
                f"{' and '.join(parts)}; {more}")

    def to_dict(self, name=str) -> dict:
        return {"recommended": name(self.recommended), "best": name(self.best), "tolerance": self.tolerance,
                "confidence": self.confidence, "sure": self.sure, "undecided": [name(r) for r in self.undecided],
                "unshown": [name(r) for r in self.unshown], "message": self.message(name),
                "vs_best": {name(r): c.to_dict() for r, c in self.comparisons.items()},
                "vs_larger": {name(r): c.to_dict() for r, c in self.margins.items()}}


def decide(metric: str, stats: Mapping[Hashable, torch.Tensor], reduce: Reduce, higher_is_better: bool,
           tolerance: float, boot: Bootstrap, size: Optional[Mapping[Hashable, float]] = None,
           candidate: Callable[[Hashable], bool] = lambda r: r != 0, scores: bool = False) -> Decision:
    """Compare every entry of `stats` ({entry: (n_entry, S) per-row stats}) with the best candidate
    and recommend the smallest candidate that is good enough (by entry order, or by `size`).
    Rank 0 (the base) is compared but never recommended. The best is taken among the entries
    measured on the most rows (an entry dropped early by an adaptive sweep cannot be best)."""
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    values = {r: float(reduce(s.double().sum(0))) for r, s in stats.items() if s.shape[0]}
    cands = [r for r in values if candidate(r) and not math.isnan(values[r])]
    if not cands:
        raise ValueError("no rank above 0 was measured")
    most = max(stats[r].shape[0] for r in cands)
    full = [r for r in cands if stats[r].shape[0] == most]
    best = (max if higher_is_better else min)(full, key=lambda r: values[r])
    key = (lambda r: (size[r], str(r))) if size is not None else (lambda r: r)
    versus = lambda a, b: compare(stats[a], stats[b], reduce, higher_is_better, tolerance, boot, scores)  # noqa: E731
    return _decision(metric, list(values), cands, best, versus, key, tolerance, boot.confidence, most)


def _decision(metric: str, entries: list, cands: list, best: Hashable,
              versus: Callable[[Hashable, Hashable], Comparison], key: Callable, tolerance: float,
              confidence: float, rows: int) -> Decision:
    """The rule both deciders share, given `versus(a, b)` (a compared with b): every entry against
    the best, the smallest candidate (by `key`) good enough, the smaller ones undecided, and the
    pick against every larger candidate not shown worse than the best (one shown worse than the
    best by more than the tolerance cannot be far better than the pick, which is shown within it)."""
    itself = Comparison(0.0, (0.0, 0.0), (0.0, 0.0), GOOD, rows)  # the best against itself: no deficit
    comparisons = {r: itself if r == best else versus(r, best) for r in entries}
    good = sorted((r for r in cands if comparisons[r].verdict == GOOD), key=key)
    recommended = good[0]  # the best itself is always good enough: its deficit is 0
    undecided = [r for r in sorted(cands, key=key)
                 if key(r) < key(recommended) and comparisons[r].verdict == UNDECIDED]
    contenders = [r for r in cands if r != best and comparisons[r].deficit_bounds[0] <= 0]
    margins = {r: comparisons[recommended] if r == best else versus(recommended, r)
               for r in sorted(cands, key=key) if key(r) > key(recommended) and comparisons[r].verdict != WORSE}
    return Decision(metric, recommended, best, tolerance, confidence, comparisons, undecided, contenders, margins)


def decide_from_estimates(metric: str, values: Mapping[Hashable, float], errors: Mapping[Hashable, float],
                          higher_is_better: bool, tolerance: float, confidence: float = DEFAULT_CONFIDENCE,
                          rows: int = 0) -> Decision:
    """The same decision as `decide` for values that come with a standard error but no per-row
    scores (lm-evaluation-harness's): each comparison by the normal approximation of the
    difference, unpaired (sqrt(se_a^2 + se_b^2): wider than a paired one, so never surer);
    an entry without a finite standard error is undecided. `rows` (0: unknown) sizes the advice."""
    cands = [r for r, v in values.items() if r != 0 and not math.isnan(v)]
    if not cands:
        raise ValueError("no rank above 0 was measured")
    best = (max if higher_is_better else min)(cands, key=lambda r: values[r])
    z1 = statistics.NormalDist().inv_cdf(confidence)
    z2 = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    sign = -1.0 if higher_is_better else 1.0

    def versus(a: Hashable, b: Hashable) -> Comparison:
        diff = values[a] - values[b]
        se = math.hypot(errors.get(a, math.nan), errors.get(b, math.nan))
        se = se if math.isfinite(se) else math.nan  # either without a standard error: undecided
        deficit = sign * diff
        return judged(diff, (diff - z2 * se, diff + z2 * se), deficit, (deficit - z1 * se, deficit + z1 * se),
                      tolerance, rows)

    entries = [r for r in values if not math.isnan(values[r])]
    return _decision(metric, entries, cands, best, versus, lambda r: r, tolerance, confidence, rows)
