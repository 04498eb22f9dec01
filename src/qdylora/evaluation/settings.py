"""How a sweep measures and decides: `SweepSettings`, the `qdylora sweep` flags (generated from
these fields and their docstrings), checked at one door whatever builds them (the command line,
`sweep_run`, `run_sweep`, a study script), and recorded in sweep.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Optional

import tyro

from ..core.allocation import DEFAULT_CALIBRATION_ROWS, DEFAULT_SCORE
from ..core.fields import AT_LEAST_ONE, NOT_NEGATIVE, SEED, Range, check_fields
from ..errors import QDyLoRAError
from ..training.sampling import parse_ranks
from .confidence import DEFAULT_CONFIDENCE, DEFAULT_SEED
from .metrics import METRICS


def split_list(text: Optional[str]) -> list[str]:
    """A comma-separated flag value as its items ("loss, exact_match" -> ["loss", "exact_match"])."""
    return [x.strip() for x in (text or "").split(",") if x.strip()]


@dataclass
class SweepSettings:
    """What a sweep measures, on which rows, and how it decides the recommended rank."""

    data: Optional[str] = None
    """Evaluation data in the run's format (default: asdiv:test for runs on the embedded ASDiv, else the run's validation rows)."""

    ranks: Annotated[Optional[str], tyro.conf.arg(aliases=("--rank",))] = None
    """Ranks to measure, e.g. "1,2,4,8,16,32,64" or "1-64" (default: powers of two up to max_rank); 0 is always added."""

    metrics: str = "loss,exact_match"
    """Comma-separated: loss (mean token loss and perplexity on responses), exact_match (greedy answer vs reference: final number for numeric answers, normalised text otherwise; a list of references matches any), choice (multiple choice by log-likelihood: acc and acc_norm, as lm-evaluation-harness), rouge (rouge-1/2/L F1 of greedy answers), bleu (sacrebleu corpus BLEU)."""

    shots: Annotated[int, NOT_NEGATIVE] = 0
    """choice: solved questions before each question (from --shots-data, else the first rows, then not evaluated)."""

    shots_data: Optional[str] = None
    """choice: file (or embedded set) the --shots solved questions come from."""

    prompt_template: Optional[str] = None
    """Read the evaluation rows with this prompt template (with --response-template) instead of the run's, e.g. "{question}"."""

    response_template: Optional[str] = None
    """The response (reference) template that goes with --prompt-template, e.g. "{answer}"."""

    lm_eval: Optional[str] = None
    """Comma-separated lm-evaluation-harness tasks to run at every rank (pip install 'qdylora[lm-eval]'), e.g. mmlu,gsm8k."""

    lm_eval_include: Optional[str] = None
    """Directory of your own lm-eval task YAMLs (the harness's --include_path), e.g. for local data offline."""

    lm_eval_limit: Annotated[Optional[int], AT_LEAST_ONE] = None
    """At most this many documents per lm-eval task (the harness's --limit)."""

    budgets: Optional[str] = None
    """Also measure per-layer ranks at these budgets, e.g. "1,2,4" (average ranks: the parameter counts of uniform ranks 1, 2, 4), "1.5M" or "4MB"; each is made once per --scores and kept in RUN/allocations/."""

    scores: str = DEFAULT_SCORE
    """Comma-separated scores the --budgets allocations are made with: svd, output, loss."""

    calibration_rows: Annotated[int, NOT_NEGATIVE] = DEFAULT_CALIBRATION_ROWS
    """Training rows the output and loss scores are measured on (0 = all)."""

    batch_size: Annotated[int, AT_LEAST_ONE] = 8
    """Examples per batch (each is replicated once per rank in a rank batch)."""

    rank_batch: Annotated[int, NOT_NEGATIVE] = 0
    """Ranks evaluated together in one forward pass (0 = all; 1 = one after another, for low memory)."""

    max_new_tokens: Annotated[int, AT_LEAST_ONE] = 32
    """Longest generated answer for exact_match."""

    max_examples: Annotated[int, NOT_NEGATIVE] = 0
    """Use only the first N evaluation rows (0 = all)."""

    loss_tolerance: Annotated[float, NOT_NEGATIVE] = 0.01
    """How much worse than the best rank's loss a rank may be and still count as good enough, in nats per token (0.01: a perplexity at most 1 % higher)."""

    accuracy_tolerance: Annotated[float, NOT_NEGATIVE] = 1.0
    """How many points below the best rank a score in percent (exact_match, acc, rouge, bleu) may be and still count as good enough."""

    confidence: Annotated[float, Range(0.5, 1, open_high=True)] = DEFAULT_CONFIDENCE
    """Confidence of the intervals and of "good enough": the recommended rank is, at this confidence, within the tolerance of the best (paired bootstrap over rows)."""

    exhaustive: bool = False
    """Measure every rank on every row. By default rows are measured in rounds and ranks already decided stop being measured (keeping the exhaustive decision)."""

    quick: bool = False
    """A cheaper first look: also stop measuring ranks that no number of these rows could decide, and ranks that only might turn out best (about one rank's cost; the pick differs from the exhaustive one more often: docs/performance.md)."""

    seed: Annotated[int, SEED] = DEFAULT_SEED
    """Seed of the row order and of the bootstrap resamples (a sweep is reproducible)."""

    def __post_init__(self) -> None:
        check_fields(self, flags=True)  # types, finiteness and bounds (core/fields.py), named as flags
        if self.exhaustive and self.quick:
            raise QDyLoRAError("--exhaustive and --quick ask for opposite things: give one of them")
        unknown = [m for m in self.metric_names if m not in METRICS]
        if unknown:
            raise QDyLoRAError(f"unknown metric {unknown[0]!r}: use {', '.join(METRICS)}")
        if not self.metric_names and not self.tasks:
            raise QDyLoRAError(f"no metric to measure: use one or more of {', '.join(METRICS)}")
        if self.ranks is not None and not any(r > 0 for r in self.rank_list):
            raise QDyLoRAError(f"--ranks {self.ranks} measures the base model only, and a sweep compares "
                               "adapter ranks: add a rank above 0 (--ranks 0,1,8,64)")

    @property
    def rank_list(self) -> Optional[list[int]]:
        """The --ranks asked for, or None (the default: powers of two up to the run's max_rank)."""
        return parse_ranks(self.ranks) if self.ranks is not None else None

    @property
    def metric_names(self) -> list[str]:
        return split_list(self.metrics)

    @property
    def tasks(self) -> list[str]:
        """The lm-eval tasks."""
        return split_list(self.lm_eval)

    def tolerance(self, higher_is_better: bool) -> float:
        """The tolerance of a value: points for a score, nats per token for a loss."""
        return self.accuracy_tolerance if higher_is_better else self.loss_tolerance

    def to_dict(self) -> dict:
        return asdict(self)
