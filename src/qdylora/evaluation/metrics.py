"""What a sweep can measure: one row per `--metrics` name, naming how its rows are scored (the
family), the values it reports, how each value is reduced from per-row statistics, which way is
better and how a plot labels it. A new metric is one row here (and, for a new family, its
scoring in `sweep.py`).

Per-row statistics are (n, k) float64 tensors whose column sums reduce to the value: (score, 1)
for a mean over rows, (summed token loss, tokens) for the loss, sacrebleu's 10 counts for BLEU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .confidence import Reduce, exp_ratio, ratio
from .text_metrics import bleu_from_stats, bleu_stats, exact_match_rows, rouge_rows

PERCENT = ratio(100.0)  # a score in percent from per-row statistics (score 0..1, 1)


@dataclass(frozen=True)
class Value:
    """One reported value of a metric."""

    name: str  # its key in sweep.json, the table, the CSV and the plot
    reduce: Reduce  # summed per-row statistics (..., k) -> the value
    higher_is_better: bool
    label: str  # the plot's axis label
    recommended: bool = True  # False: a value that ranks as another does (perplexity as loss)


Scorer = Callable[[Sequence[str], Sequence[Sequence[str]]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Metric:
    """A `--metrics` name: the family that scores its rows and the values it reports."""

    name: str
    family: str  # "loss" (teacher-forced answer loss), "generation" (one shared greedy answer), "choice"
    values: tuple[Value, ...]
    score: Optional[Scorer] = None  # generation: per-row statistics of each value from answers, references


def mean_rows(per_row: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """(n,) per-row scores -> (n, 2) statistics (score, 1) of their mean."""
    per_row = torch.as_tensor(per_row, dtype=torch.float64)
    return torch.stack([per_row, torch.ones_like(per_row)], dim=1)


def _percent(name: str, label: str) -> Value:
    return Value(name, PERCENT, True, label)


TABLE = (
    Metric("loss", "loss", (Value("loss", ratio(), False, "response token loss"),
                            Value("perplexity", exp_ratio, False, "perplexity", recommended=False))),
    Metric("exact_match", "generation", (_percent("exact_match", "exact match, %"),),
           lambda outs, refs: {"exact_match": mean_rows(exact_match_rows(outs, refs))}),
    Metric("choice", "choice", (_percent("acc", "choice accuracy, %"),
                                _percent("acc_norm", "choice accuracy (length-normalised), %"))),
    Metric("rouge", "generation", (_percent("rouge1", "ROUGE-1 F1, %"), _percent("rouge2", "ROUGE-2 F1, %"),
                                   _percent("rougeL", "ROUGE-L F1, %")),
           lambda outs, refs: {k: mean_rows(v) for k, v in rouge_rows(outs, refs).items()}),
    Metric("bleu", "generation", (Value("bleu", bleu_from_stats, True, "BLEU"),),
           lambda outs, refs: {"bleu": bleu_stats(outs, refs)}),
)
METRICS = {m.name: m for m in TABLE}  # what --metrics takes, in the table's order
VALUES = {v.name: v for m in TABLE for v in m.values}  # lm-eval's values are not here: `value`


def value(name: str, higher_is_better: bool = True) -> Value:
    """The table's row of a value; a value from elsewhere (lm-eval) is a score in percent."""
    return VALUES.get(name) or Value(name, PERCENT, higher_is_better, name)


def of_family(metrics: Sequence[str], family: str) -> list[Metric]:
    """The requested metrics that `family` scores, in the table's order."""
    return [m for m in TABLE if m.name in metrics and m.family == family]
