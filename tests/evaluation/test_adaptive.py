"""Adaptive measuring: rounds, which entries stay open, and the same decision as measuring every
entry on every row where the answer is clear (for less)."""

from __future__ import annotations

import torch

from qdylora.evaluation.adaptive import early_confidence, judge_by, measure, open_entries, round_sizes, row_order
from qdylora.evaluation.confidence import Bootstrap, decide, ratio

from .test_confidence import losses

RANKS = [0, 1, 2, 4, 8, 16, 32, 64]


def stored(stats: dict[int, torch.Tensor], calls: list):
    """A score function that reads precomputed per-row stats (and logs what it was asked)."""
    def score(entries, rows):
        calls.append((list(entries), len(rows)))
        return {"loss": {e: stats[e][rows] for e in entries}}
    return score


def decisions(stats, boot):
    return [decide("loss", stats["loss"], ratio(), False, 0.01, boot)]


def test_round_sizes_double_the_rows_measured():
    assert round_sizes(800) == [100, 100, 200, 400]
    assert round_sizes(100) == [32, 32, 36]
    assert round_sizes(20) == [20]
    assert sum(round_sizes(1237)) == 1237
    assert sorted(row_order(50, 0)) == list(range(50)) and row_order(50, 0) == row_order(50, 0) != row_order(50, 1)


def test_open_entries_are_the_best_and_the_undecided_smaller_ones():
    stats = losses({0: 0.5, 1: 0.3, 2: 0.008, 4: 0.0, 8: 0.0}, n=40, noise=0.03)
    d = decide("loss", stats, ratio(), False, 0.01, Bootstrap())
    assert 2 in d.undecided and 1 not in d.undecided
    assert open_entries([0, 1, 2, 4, 8], [d]) == sorted({d.best, *d.undecided})
    sure = decide("loss", losses({1: 0.3, 4: 0.0}, n=400, noise=0.001), ratio(), False, 0.01, Bootstrap())
    assert sure.sure and open_entries([1, 4], [sure]) == []  # all settled: stop


def test_adaptive_equals_exhaustive_on_clear_cases_for_less():
    """Monotone quality in rank, a clear boundary at rank 8: both modes recommend 8, the adaptive
    one measuring a fraction of the (entry, row) cells."""
    effects = {0: 0.6, 1: 0.3, 2: 0.12, 4: 0.05, 8: 0.004, 16: 0.001, 32: 0.0, 64: 0.0}
    for seed in range(3):
        stats = losses(effects, n=800, noise=0.02, seed=seed)
        order = row_order(800, seed)
        boot, early = Bootstrap(), Bootstrap(early_confidence(0.95))
        full_calls, calls = [], []
        full = measure(stored(stats, full_calls), RANKS, order)
        quick = measure(stored(stats, calls), RANKS, order, judge_by(lambda s: decisions(s, early), RANKS))
        assert all(v.shape[0] == 800 for v in full["loss"].values())
        assert decisions(full, boot)[0].recommended == decisions(quick, boot)[0].recommended == 8
        cells = sum(len(e) * n for e, n in calls)
        assert cells < 0.6 * 8 * 800, calls  # ranks 16-64 stay open: any of them may turn out best
        assert all(quick["loss"][r].shape[0] < 800 for r in (0, 1, 2))  # clearly worse: dropped early


def test_undecided_entries_get_every_row():
    """Rank 2 sits at the tolerance: it is measured on every row, as the exhaustive sweep would."""
    effects = {0: 0.6, 1: 0.3, 2: 0.01, 4: 0.0, 8: 0.0}
    stats = losses(effects, n=300, noise=0.05)
    early = Bootstrap(early_confidence(0.95))
    quick = measure(stored(stats, []), [0, 1, 2, 4, 8], row_order(300, 0),
                    judge_by(lambda s: decisions(s, early), [0, 1, 2, 4, 8]))
    assert quick["loss"][2].shape[0] == 300


def test_quick_mode_stops_entries_no_row_count_could_decide():
    """Ranks that all the rows could not tell apart (a metric at chance, or a rank sitting on the
    tolerance): in the quick mode (the total row count given) they stop after the first rounds,
    and the final verdicts are the exhaustive sweep's: undecided."""
    effects = {0: 0.0, 1: 0.0, 2: 0.0, 4: 0.0, 8: 0.0}
    stats = losses(effects, n=300, noise=0.5)
    boot, early = Bootstrap(), Bootstrap(early_confidence(0.95))
    entries = [0, 1, 2, 4, 8]
    full = decisions(measure(stored(stats, []), entries, row_order(300, 0)), boot)[0]
    assert full.undecided and all(full.comparisons[r].rows_needed > 4 * 300 for r in full.undecided)
    calls, unbounded_calls = [], []
    quick = measure(stored(stats, calls), entries, row_order(300, 0),
                    judge_by(lambda s: decisions(s, early), entries, 300))
    # rank 1 would need more than 4x the rows: it stops after the first round; ranks the
    # recommendation is not yet shown within the tolerance of stay open while all the rows might show it
    assert quick["loss"][1].shape[0] < 300 and quick["loss"][0].shape[0] < 300
    verdicts = decisions(quick, boot)[0]
    assert verdicts.undecided and not verdicts.sure  # still said: these rows cannot decide them
    # the default mode (no row count) measures them further
    measure(stored(stats, unbounded_calls), entries, row_order(300, 0),
            judge_by(lambda s: decisions(s, early), entries))
    assert sum(len(e) * n for e, n in calls) < sum(len(e) * n for e, n in unbounded_calls)


def test_a_tie_on_the_first_rows_does_not_settle_the_best():
    """Rank 1 ties rank 2 on the first rows and so is both the best and the recommendation:
    nothing smaller is undecided, yet rank 2 is truly better. The default mode keeps measuring
    the ranks not shown worse than the best (contenders) and ends as the exhaustive sweep does."""
    n = 300
    first = torch.zeros(n, dtype=torch.float64)
    second = torch.zeros(n, dtype=torch.float64)
    second[40::4] = 1.0  # rank 2 answers a quarter of the later rows that rank 1 misses
    stats = {1: torch.stack([first, torch.ones(n, dtype=torch.float64)], 1),
             2: torch.stack([second, torch.ones(n, dtype=torch.float64)], 1)}
    order = list(range(n))  # the tie comes first
    boot, early = Bootstrap(), Bootstrap(early_confidence(0.95))

    def decided(stats, boot):
        return [decide("acc", stats["acc"], ratio(100.0), True, 1.0, boot, scores=True)]

    full = decided({"acc": stats}, boot)[0]
    assert full.recommended == 2 and full.best == 2

    def score(entries, rows):
        return {"acc": {e: stats[e][rows] for e in entries}}

    kept = measure(score, [1, 2], order, judge_by(lambda s: decided(s, early), [1, 2]))
    first_round = round_sizes(n)[0]  # 38 rows: rank 2's first win is on row 40
    assert decided(kept, boot)[0].recommended == 2 and kept["acc"][2].shape[0] > first_round
    # without the contenders (the quick mode) the tie on the first rows settled it: rank 1
    quick = measure(score, [1, 2], order, judge_by(lambda s: decided(s, early), [1, 2], n))
    assert decided(quick, boot)[0].recommended == 1 and quick["acc"][2].shape[0] == first_round
