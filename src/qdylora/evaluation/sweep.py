"""The rank sweep: quality of one trained adapter at every requested rank, and the smallest
rank that is good enough.

Rank 0 (the base model without adapter) is always measured as the reference row.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..console import log
from ..core.allocation import Allocation, layer_costs
from ..core.model import QDyLoRAModel
from ..core.rank import evaluating
from ..data.batching import pad_token_id
from ..data.datasets import fitted
from ..data.embedded import EVAL_TEMPLATES
from ..data.settings import DataSettings
from ..data.rows import (EMBEDDED_PREFIX, generation_prompts, read_rows, row_format, rows_fingerprint, run_rows,
                         split_references, tokenize)
from ..errors import QDyLoRAError
from ..files import finish_moves, written_together
from ..training.losses import autocast_context, batch_losses_at_ranks, padded
from ..training.rundir import RunDir, load_run, read_json
from ..training.sampling import check_ranks
from ..training.settings import RunSettings
from .adaptive import early_confidence, judge_by, measure, row_order, rows_measured
from .choice import (choice_hits, choice_logliks_shared, choice_questions, encode_questions, few_shot,
                     shared_batch_count)
from .confidence import DEFAULT_CONFIDENCE, Bootstrap, Decision, decide, decide_from_estimates, is_binary, wilson
from .generation import generate_at_ranks
from .metrics import METRICS, PERCENT, VALUES, mean_rows, of_family, value
from .settings import SweepSettings, split_list

SWEEP_FILES = {"json": "sweep.json", "csv": "sweep.csv", "png": "sweep.png"}
SWEEP_JOURNAL = ".sweep.moves.json"  # the renames of a sweep's files in progress


Entry = Union[int, Allocation]  # a uniform rank, or per-layer ranks (`core.allocation`)


@dataclass
class SweepResult:
    """Per-value scores at each rank (rank 0 = base model), their intervals, and the recommended
    rank of each value with the decision behind it.

    values: "loss" (mean response-token loss), "perplexity", "exact_match", "acc", "acc_norm",
    "rouge1", "rouge2", "rougeL", "bleu" (percent), and "lm_eval:TASK:METRIC" (as the harness
    reports them; fractions in [0, 1] as percent). `ranks` may hold allocations after the
    uniform ranks (keyed by their name in files); `params` is each entry's adapter size, and
    `smallest` the smallest entry by parameters shown good enough (with allocations).
    `intervals` are two-sided at `confidence` (bootstrap over rows; for lm-eval values the
    harness's standard error); `rows` how many rows each value of each entry was measured on
    (fewer than `examples` where an adaptive sweep stopped measuring it); `decisions` the
    paired comparisons behind `recommended` (`confidence.Decision`)."""

    ranks: list[Entry]
    values: dict[str, dict[Entry, float]]
    recommended: dict[str, Entry]
    examples: int
    seconds: dict[str, float] = field(default_factory=dict)
    samples: dict[Entry, list[str]] = field(default_factory=dict)  # first generations per rank
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    params: dict[Entry, int] = field(default_factory=dict)
    smallest: dict[str, str] = field(default_factory=dict)
    intervals: dict[str, dict[Entry, tuple[float, float]]] = field(default_factory=dict)
    rows: dict[str, dict[Entry, int]] = field(default_factory=dict)
    decisions: dict[str, Decision] = field(default_factory=dict)
    smallest_decisions: dict[str, Decision] = field(default_factory=dict)
    confidence: float = DEFAULT_CONFIDENCE
    adaptive: bool = False
    row_stats: dict[str, dict[Entry, torch.Tensor]] = field(default_factory=dict, repr=False)  # not saved
    settings: dict = field(default_factory=dict)  # the SweepSettings it was measured with

    @property
    def allocations(self) -> list[Allocation]:
        return [r for r in self.ranks if isinstance(r, Allocation)]

    def messages(self) -> list[str]:
        """One line per decision: what is recommended, how sure, what more rows would settle."""
        lines = [d.message(str) for d in self.decisions.values()]
        return lines + [d.message(str).replace(": rank ", ": adapter ", 1) for d in self.smallest_decisions.values()]

    def to_dict(self) -> dict:
        return {
            "ranks": [str(r) if isinstance(r, Allocation) else r for r in self.ranks],
            "examples": self.examples,
            "values": {m: {str(r): v for r, v in vals.items()} for m, vals in self.values.items()},
            "recommended": {m: r if isinstance(r, int) else str(r) for m, r in self.recommended.items()},
            **({"smallest": self.smallest} if self.smallest else {}),
            "confidence": self.confidence,
            "adaptive": self.adaptive,
            "intervals": {m: {str(r): list(i) for r, i in vals.items()} for m, vals in self.intervals.items()},
            "rows": {m: {str(r): n for r, n in vals.items()} for m, vals in self.rows.items()},
            "decisions": {m: d.to_dict(str) for m, d in self.decisions.items()},
            **({"smallest_decisions": {m: d.to_dict(str) for m, d in self.smallest_decisions.items()}}
               if self.smallest_decisions else {}),
            "params": {str(r): n for r, n in self.params.items()},
            "higher_is_better": self.higher_is_better,
            "seconds": self.seconds,
            "samples": {str(r): s for r, s in self.samples.items()},
            **({"settings": self.settings} if self.settings else {}),
        }

    def csv(self) -> str:
        """One row per entry: its parameters, then each value with its interval and rows."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        metrics = list(self.values)
        writer.writerow(["rank", "params", *(f"{m}{part}" for m in metrics for part in ("", "_low", "_high", "_rows"))])
        for r in self.ranks:
            cells = []
            for m in metrics:
                low, high = self.intervals.get(m, {}).get(r, (math.nan, math.nan))
                cells += [f"{self.values[m][r]:.6g}", f"{low:.6g}", f"{high:.6g}", self.rows.get(m, {}).get(r, "")]
            writer.writerow([r, self.params.get(r, ""), *cells])
        return buf.getvalue()


def default_ranks(max_rank: int) -> list[int]:
    """0 (the base) and the powers of two up to max_rank, plus max_rank itself."""
    return sorted({0, max_rank} | {2**k for k in range(max_rank.bit_length()) if 2**k <= max_rank})


def eval_rows(settings: RunSettings, data: Optional[str], run_dir: str | Path) -> list[dict]:
    """Rows to evaluate: `data` if given; for a run on the embedded ASDiv, its test split; else
    the run's own validation rows (recomputed from the run's settings and seed; a warning if they
    are not the rows it validated on)."""
    d = settings.data
    if data is not None:
        return list(read_rows(data, d.split))  # evaluated whole: decoded once
    if d.data == f"{EMBEDDED_PREFIX}train":
        return read_rows(f"{EMBEDDED_PREFIX}test")
    _, _, val_rows, val_idx = run_rows(d, settings.adapter.seed)
    if not len(val_idx):
        raise QDyLoRAError("the run held out no validation rows: pass --data EVAL_FILE")
    rows = [val_rows[i] for i in val_idx]
    _warn_if_changed(run_dir, rows)
    return rows


def _warn_if_changed(run_dir: str | Path, rows: Sequence[dict]) -> None:
    """Warn when the run's validation rows, rebuilt from its data settings, are not the rows it
    validated on (its data file was edited since)."""
    saved = RunDir(run_dir).data_fingerprint()
    if saved.get("validation") not in (None, rows_fingerprint(rows)):
        log.warning(f"the validation rows of {run_dir}, rebuilt from its data file, differ from the rows it was "
                    "validated on (the file changed since training): pass --data EVAL_FILE to say what to measure")


def eval_format(settings: DataSettings, data: Optional[str], prompt_template: Optional[str] = None,
                response_template: Optional[str] = None) -> DataSettings:
    """The data settings that read the evaluation rows: the run's, with the templates of an
    embedded evaluation set ("mmlu:test", ...) or the ones given (the chat template, lengths and
    masking stay the run's)."""
    name = (data or "").partition(":")[0]
    if prompt_template is None and response_template is None and name in EVAL_TEMPLATES:
        prompt_template, response_template = EVAL_TEMPLATES[name]
    if prompt_template is None and response_template is None:
        return settings
    if prompt_template is None or response_template is None:
        raise QDyLoRAError("give --prompt-template and --response-template together")
    return replace(settings, format="template", prompt_template=prompt_template,
                   response_template=response_template)


def run_sweep(model: QDyLoRAModel, tokenizer, rows: Sequence[dict], data: DataSettings, ranks: Sequence[Entry],
              settings: Optional[SweepSettings] = None, *, progress: bool = True, base: bool = True) -> SweepResult:
    """Measure the metrics of `settings` (and its lm-evaluation-harness tasks) at every entry of
    `ranks` (uniform ranks, and allocations measured beside them in the same batches) on `rows`,
    formatted as in training (`data`); rank 0, the base model, is added unless `base` is False
    (e.g. where it was measured on the same rows before).

    Every value gets a seeded bootstrap interval at the settings' confidence, and each
    recommendation is the smallest rank shown (at that confidence) to be worse than the best by at
    most the tolerance (`confidence.decide`). Unless exhaustive, rows are measured in rounds and
    ranks already decided stop being measured (`adaptive`); quick also stops those no row count
    here could decide (a cheaper first look that agrees less often with the exhaustive pick)."""
    s = settings or SweepSettings()
    entries = _entries(model, ranks, base)
    if not rows and s.metric_names:
        raise QDyLoRAError("the evaluation data is empty")
    manager = None
    if s.tasks:
        from .harness import task_manager

        manager = task_manager(s.tasks, s.lm_eval_include)  # an unknown task or no harness: before any work
    data = fitted(data, model)
    ctx = _Context(model, tokenizer, entries, s.batch_size, s.rank_batch, progress)
    costs = layer_costs(model)
    params = {r: r.params(costs) if isinstance(r, Allocation) else r * sum(costs.values()) for r in entries}
    sized = any(isinstance(r, Allocation) for r in entries)
    rule = DecisionRule.make(s, params if sized else None)
    shots_rows = list(read_rows(s.shots_data, data.split)) if s.shots_data else None
    families = _families(ctx, rows, data, s, shots_rows)
    stats: dict[str, dict[Entry, torch.Tensor]] = {}
    with evaluating(model):
        for family in families:
            stats.update(ctx.timed(family.name, lambda: _measure(ctx, family, rule, s.exhaustive, s.seed, s.quick)))
        result = _result(entries, stats, rule, len(rows), ctx, params, s)
        result.samples = next((f.samples for f in families if f.samples), {})
        if s.tasks:
            _add_harness(result, ctx, s, manager)
    return result


def _entries(model: QDyLoRAModel, ranks: Sequence[Entry], base: bool) -> list[Entry]:
    """The uniform ranks in order (0, the base, first unless not `base`), then the allocations."""
    allocations = list(dict.fromkeys(r for r in ranks if isinstance(r, Allocation)))
    ints = [r for r in ranks if not isinstance(r, Allocation)]
    check_ranks([r for r in ints if r != 0], model.qdylora_config.max_rank)  # 0, the base, is always measured
    return sorted(set(ints) | ({0} if base else set())) + allocations


def _families(ctx: "_Context", rows, data: DataSettings, s: SweepSettings, shots_rows) -> list["_Family"]:
    """The ways of scoring rows the requested metrics need, each once."""
    metrics, families = s.metric_names, []
    rf = row_format(data, rows[0].keys(), data.data or "the evaluation data") if of_family(
        metrics, "loss") or of_family(metrics, "generation") else None
    if of_family(metrics, "loss"):
        families.append(_loss_family(ctx, rows, rf, data))
    if of_family(metrics, "generation"):
        families.append(_generation_family(ctx, rows, rf, data, of_family(metrics, "generation"), s.max_new_tokens))
    if of_family(metrics, "choice"):
        families.append(_choice_family(ctx, rows, data, s.shots, shots_rows))
    return families


def _result(entries: list[Entry], stats: dict[str, dict[Entry, torch.Tensor]], rule: "DecisionRule", examples: int,
            ctx: "_Context", params: dict[Entry, int], s: SweepSettings) -> SweepResult:
    """The sweep's values, intervals and decisions from the per-row statistics of every value."""
    values = {v: {r: float(value(v).reduce(x.sum(0))) if x.shape[0] else math.nan for r, x in by.items()}
              for v, by in stats.items()}
    intervals = {v: {r: _interval(v, x, rule.boot) for r, x in by.items()} for v, by in stats.items()}
    decisions = rule.decisions(stats, rule.boot)
    smallest = rule.decisions(stats, rule.boot, sized=True) if rule.params else {}
    return SweepResult(entries, values, {v: d.recommended for v, d in decisions.items()}, examples, ctx.seconds,
                       {}, {v: value(v).higher_is_better for v in values}, params,
                       {v: str(d.recommended) for v, d in smallest.items()}, intervals, rows_measured(stats),
                       decisions, smallest, s.confidence, not s.exhaustive, stats, s.to_dict())


def _add_harness(result: SweepResult, ctx: "_Context", s: SweepSettings, manager) -> None:
    """lm-evaluation-harness values at every entry, decided by the same rule on the harness's
    standard errors (no per-row scores)."""
    harness, higher, intervals, errors = ctx.timed("lm_eval", lambda: _harness_values(
        ctx, s.tasks, manager, s.lm_eval_limit, s.confidence))
    result.values.update(harness)
    result.higher_is_better.update(higher)
    result.intervals.update(intervals)
    for v, vals in harness.items():
        result.decisions[v] = decide_from_estimates(v, vals, errors[v], higher[v], s.tolerance(higher[v]),
                                                    s.confidence, rows=s.lm_eval_limit or 0)
        result.recommended[v] = result.decisions[v].recommended


def _interval(name: str, stats: torch.Tensor, boot: Bootstrap) -> tuple[float, float]:
    """A value's interval: Wilson's for a score in percent from 0/1 rows (the bootstrap gives
    "0.00 +-0.00" for 0 of 32), else the bootstrap's."""
    reduce = value(name).reduce
    if reduce is PERCENT and stats.shape[0] and is_binary(stats):
        low, high = wilson(float(stats[:, 0].sum()), stats.shape[0], boot.confidence)
        return 100.0 * low, 100.0 * high
    return boot.interval(stats, reduce)


@dataclass
class DecisionRule:
    """How a sweep decides: the tolerances, the bootstraps of final and early verdicts, and the
    entries' sizes (with allocations: the smallest adapter by parameters is decided too). Public
    so that a study can replay a sweep's decisions on stored per-row statistics."""

    settings: SweepSettings
    boot: Bootstrap
    early: Bootstrap
    params: Optional[dict[Entry, int]]

    @classmethod
    def make(cls, settings: Optional[SweepSettings] = None,
             params: Optional[dict[Entry, int]] = None) -> "DecisionRule":
        s = settings or SweepSettings()
        return cls(s, Bootstrap(s.confidence, seed=s.seed), Bootstrap(early_confidence(s.confidence), seed=s.seed),
                   params)

    def decisions(self, stats: dict[str, dict[Entry, torch.Tensor]], boot: Bootstrap,
                  sized: bool = False) -> dict[str, Decision]:
        """{value: decision} of every recommended value: among uniform ranks, or (`sized`) among
        every entry by parameters."""
        among = dict(size=self.params) if sized else dict(candidate=lambda r: isinstance(r, int) and r != 0)
        out = {}
        for name, by in stats.items():
            v = value(name)
            if v.recommended:
                out[name] = decide(name, by, v.reduce, v.higher_is_better, self.settings.tolerance(v.higher_is_better),
                                   boot, **among, scores=v.reduce is PERCENT)
        return out

    def judge(self, entries: Sequence[Entry], quick_rows: Optional[int] = None):
        """A judge for `adaptive.measure`: early verdicts on the ranks, and on the allocations
        (`quick_rows`, all the rows there are: the quick mode of `adaptive.open_entries`)."""
        def decide_all(stats):
            found = list(self.decisions(stats, self.early).values())
            return found + (list(self.decisions(stats, self.early, sized=True).values()) if self.params else [])

        return judge_by(decide_all, entries, quick_rows)


@dataclass
class _Family:
    """One way of scoring rows (the loss passes, one greedy generation, multiple choice): `score`
    gives the per-row statistics of each of its values at some entries on some rows."""

    name: str
    rows: int
    score: Callable[[list, list[int]], dict[str, dict[Entry, torch.Tensor]]]
    samples: dict = field(default_factory=dict)
    batches: Optional[Callable[[list[int]], int]] = None  # batches per rank group on these rows; else rows / batch size


def _measure(ctx: "_Context", family: _Family, rule: DecisionRule, exhaustive: bool, seed: int, quick: bool):
    """The family's per-row statistics at every entry: on every row, or adaptively (`quick`:
    dropping what no row count here could decide, too)."""
    order = row_order(family.rows, seed)
    with ctx.bar(family.name) as bar:
        def on_round(rows: list[int], entries: int) -> None:
            batches = family.batches(rows) if family.batches else math.ceil(len(rows) / ctx.batch_size)
            bar.total += batches * math.ceil(entries / (ctx.rank_batch or entries))
            bar.refresh()

        ctx.on_batch = lambda k: bar.update(1)
        judge = None if exhaustive else rule.judge(ctx.ranks, family.rows if quick else None)
        return measure(family.score, ctx.ranks, order, judge, on_round)


@dataclass
class _Context:
    """What every metric of one sweep shares: the model, its device and dtype, the ranks."""

    model: QDyLoRAModel
    tokenizer: object
    ranks: list[Entry]
    batch_size: int
    rank_batch: int
    progress: bool
    seconds: dict[str, float] = field(default_factory=dict)
    on_batch: Optional[Callable[[int], None]] = None

    def __post_init__(self) -> None:
        self.device = next(self.model.parameters()).device
        dtype = self.model.qdylora_config.torch_compute_dtype
        self.autocast = lambda: autocast_context(self.device, dtype, dtype != torch.float32)
        self.pad_id = pad_token_id(self.tokenizer)

    def bar(self, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=0, desc=desc, unit="batch", disable=not self.progress)

    def timed(self, name: str, work):
        start = time.perf_counter()
        result = work()
        self.seconds[name] = time.perf_counter() - start
        return result


def _loss_family(ctx: _Context, rows, rf, data: DataSettings) -> _Family:
    """Mean response-token loss (of the first reference where a row has several) and perplexity:
    per-row statistics (summed token loss, tokens)."""
    rows = [split_references(row, i, rf)[0] for i, row in enumerate(rows)]
    examples, _ = tokenize(rows, ctx.tokenizer, rf, max_source_length=data.max_source_length,
                           max_target_length=data.max_target_length)
    if not examples:
        raise QDyLoRAError("no evaluation example is left after tokenization")

    def score(entries: list, idx: list[int]) -> dict[str, dict[Entry, torch.Tensor]]:
        order = sorted(range(len(idx)), key=lambda i: -len(examples[idx[i]]))  # least padding
        batches = [[examples[idx[i]] for i in order[s:s + ctx.batch_size]]
                   for s in range(0, len(order), ctx.batch_size)]
        sums = batch_losses_at_ranks(ctx.model, padded(batches, ctx.pad_id, ctx.device), entries, ctx.rank_batch,
                                     ctx.autocast, ctx.on_batch)  # {entry: ((n,), (n,)) in batch order}
        position = torch.tensor(order)
        out = {}
        for r, (loss, count) in sums.items():
            out[r] = torch.empty(len(idx), 2, dtype=torch.float64)
            out[r][position] = torch.stack([loss, count.double()], dim=1)
        return {v.name: out for v in METRICS["loss"].values}  # loss and perplexity: the same statistics

    return _Family("loss", len(examples), score)


def _generation_family(ctx: _Context, rows, rf, data: DataSettings, metrics: list, max_new_tokens: int) -> _Family:
    """The values of `metrics` (`metrics.Metric` rows of the generation family: exact_match, rouge,
    bleu) from one greedy generation per row and entry."""
    prompts, refs = generation_prompts(rows, ctx.tokenizer, rf, max_source_length=data.max_source_length)
    samples: dict[Entry, list[str]] = {}  # the first generations of each entry

    def score(entries: list, idx: list[int]) -> dict[str, dict[Entry, torch.Tensor]]:
        with ctx.autocast():
            outputs = generate_at_ranks(ctx.model, ctx.tokenizer, [prompts[i] for i in idx], entries,
                                        batch_size=ctx.batch_size, max_new_tokens=max_new_tokens,
                                        rank_batch=ctx.rank_batch, device=ctx.device, on_batch=ctx.on_batch)
        references = [refs[i] for i in idx]
        values: dict[str, dict[Entry, torch.Tensor]] = {}
        for r, outs in outputs.items():
            samples.setdefault(r, outs[:3])
            for metric in metrics:
                for name, stats in metric.score(outs, references).items():
                    values.setdefault(name, {})[r] = stats
        return values

    return _Family("generation", len(prompts), score, samples)


def _choice_family(ctx: _Context, rows, data: DataSettings, shots: int,
                   shots_rows: Optional[Sequence[dict]]) -> _Family:
    """acc and acc_norm: each question's prompt run once and its options packed after it
    (`choice.choice_logliks_shared`), every rank in the same rank-batched passes."""
    solved, rows, first = few_shot(rows, shots, shots_rows)
    questions = choice_questions(rows, first_row=first)
    chat = data.chat_template and data.format != "text"
    encoded = encode_questions(questions, ctx.tokenizer, chat=chat, shots=solved,
                               max_length=data.max_source_length + data.max_target_length)

    def score(entries: list, idx: list[int]) -> dict[str, dict[Entry, torch.Tensor]]:
        logliks = choice_logliks_shared(ctx.model, [encoded[i] for i in idx], entries, pad_id=ctx.pad_id,
                                        batch_size=ctx.batch_size, rank_batch=ctx.rank_batch,
                                        autocast=ctx.autocast, on_batch=ctx.on_batch)
        hits = {r: choice_hits(ll, [questions[i] for i in idx]) for r, ll in logliks.items()}
        return {v.name: {r: mean_rows(h[v.name]) for r, h in hits.items()} for v in METRICS["choice"].values}

    return _Family("choice", len(questions), score,
                   batches=lambda idx: shared_batch_count(ctx.model, [encoded[i] for i in idx], ctx.batch_size))


def _harness_values(ctx: _Context, tasks: Sequence[str], manager, limit, confidence: float,
                    ) -> tuple[dict, dict[str, bool], dict, dict]:
    """lm-evaluation-harness scores as "lm_eval:TASK:METRIC" values (fractions become percent),
    their directions, intervals of +- z * the harness's standard error (normal approximation;
    nan where the harness gives none), and those standard errors."""
    from statistics import NormalDist

    from tqdm.auto import tqdm

    from .harness import harness_at_ranks

    with tqdm(total=len(ctx.ranks), desc="lm-eval", unit="rank", disable=not ctx.progress) as bar:
        scores, higher = harness_at_ranks(ctx.model, ctx.tokenizer, tasks, ctx.ranks, manager=manager, limit=limit,
                                          batch_size=ctx.batch_size, on_rank=lambda r: bar.update(1),
                                          with_stderr=True)
    values: dict[str, dict[int, float]] = {}
    errors: dict[str, dict[int, float]] = {}
    for r, by_task in scores.items():
        for task, metrics in by_task.items():
            for metric, x in metrics.items():
                if metric.endswith("_stderr"):
                    errors.setdefault(f"lm_eval:{task}:{metric.removesuffix('_stderr')}", {})[r] = x
                else:
                    values.setdefault(f"lm_eval:{task}:{metric}", {})[r] = x
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    directions, intervals, ses = {}, {}, {}
    for name, vals in values.items():
        _, task, metric = name.split(":", 2)
        scale = 100.0 if all(0.0 <= v <= 1.0 for v in vals.values()) else 1.0
        values[name] = {r: scale * v for r, v in vals.items()}
        ses[name] = {r: scale * errors.get(name, {}).get(r, math.nan) for r in vals}
        intervals[name] = {r: (values[name][r] - z * ses[name][r], values[name][r] + z * ses[name][r]) for r in vals}
        directions[name] = higher.get(task, {}).get(metric.split("[")[0], True)
    return values, directions, intervals, ses


def sweep_run(run_dir: str | Path, settings: Optional[SweepSettings] = None, *, out: Optional[str | Path] = None,
              overwrite: bool = False, device: Optional[str] = None, trust_remote_code: bool = False,
              title: Optional[str] = None, progress: bool = True) -> tuple[SweepResult, dict[str, Path]]:
    """Open a training run, measure it as `settings` ask (default ranks: powers of two up to
    max_rank; the base always; default data: `eval_rows`), and write sweep.json, sweep.csv and
    sweep.png into `out` (default: the run directory). With budgets, per-layer allocations at each
    budget under each score are measured beside the ranks (made once, kept in RUN/allocations/)."""
    from .budgets import AllocationRequest

    s = settings or SweepSettings()
    requests = [AllocationRequest(budget=b, score=score, calibration_rows=s.calibration_rows)
                for b in split_list(s.budgets) for score in split_list(s.scores)]  # bad ones fail before loading
    out = Path(out or run_dir)
    finish_moves(out / SWEEP_JOURNAL)  # an earlier sweep killed among its renames: its files complete
    existing = [n for n in SWEEP_FILES.values() if (out / n).exists()]
    if existing and not overwrite:
        raise QDyLoRAError(f"{out} already holds {', '.join(existing)}: use --overwrite or another --out")
    model, tokenizer, run = load_run(run_dir, device, trust_remote_code)
    fmt = eval_format(run.data, s.data, s.prompt_template, s.response_template)
    rows = eval_rows(run, s.data, run_dir)
    if s.max_examples > 0:
        rows = rows[:s.max_examples]
    allocations = [r.resolve(run_dir, model, tokenizer, run, batch_size=s.batch_size, progress=progress)
                   for r in requests]
    ranks = s.rank_list or default_ranks(model.qdylora_config.max_rank)
    result = run_sweep(model, tokenizer, rows, fmt, ranks + allocations, s, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    title = title or f"{run_dir} on {s.data or 'its validation rows'} ({result.examples} examples)"
    return result, write_outputs(result, out, title=title)


def recommended_rank(run_dir: str | Path, max_rank: int) -> int:
    """The rank a run's sweep.json recommends (by exact match, else choice accuracy, else loss),
    else max_rank."""
    finish_moves(Path(run_dir) / SWEEP_JOURNAL)  # a sweep killed among its renames
    sweep_file = Path(run_dir) / SWEEP_FILES["json"]
    recommended = read_json(sweep_file).get("recommended", {}) if sweep_file.is_file() else {}
    for metric in ("exact_match", "acc", "loss"):
        if metric in recommended:
            return recommended[metric]
    return max_rank


def write_outputs(result: SweepResult, out: Path, title: str = "") -> dict[str, Path]:
    """sweep.json, sweep.csv and sweep.png in `out`, appearing together (`files.written_together`:
    a process killed among the renames leaves a journal the next sweep or read completes)."""
    import json

    paths = {kind: out / name for kind, name in SWEEP_FILES.items()}
    with written_together(list(paths.values()), out / SWEEP_JOURNAL) as tmp:
        tmp[paths["json"]].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        tmp[paths["csv"]].write_text(result.csv())
        plot(result, tmp[paths["png"]], title)
    return paths


def plot(result: SweepResult, path: Path, title: str = "") -> None:
    """Each metric against rank (log2 axis), three panels a row; the base model (rank 0) as a
    dashed line and the recommended rank marked; allocations at their average rank (parameters
    over those of rank 1), one line per score."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    shown = [m for m in result.values if value(m).recommended]
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(5 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax, metric in zip(axes, shown):
        vals = result.values[metric]
        xs = [r for r in result.ranks if isinstance(r, int) and r > 0]
        ax.errorbar(xs, [vals[r] for r in xs], yerr=_yerr(result, metric, xs), marker="o", capsize=3,
                    label=f"QDyLoRA adapter at rank b ({result.confidence:.0%} interval)")
        per_rank = result.params.get(1) or (result.params[xs[0]] / xs[0] if xs and result.params else None)
        for score in dict.fromkeys(a.name.split("-")[0] for a in result.allocations):
            group = sorted((a for a in result.allocations if a.name.split("-")[0] == score),
                           key=lambda a: result.params[a])
            ax.errorbar([result.params[a] / per_rank for a in group], [vals[a] for a in group],
                        yerr=_yerr(result, metric, group), marker="s", capsize=3, linestyle="--",
                        label=f"per-layer ranks ({score} score), at their average rank")
        ax.axhline(vals[0], linestyle="--", color="gray", label="base model (rank 0)")
        base_low, base_high = result.intervals.get(metric, {}).get(0, (math.nan, math.nan))
        if not math.isnan(base_high - base_low):
            ax.axhspan(base_low, base_high, color="gray", alpha=0.12)
        rec = result.recommended.get(metric)
        if rec is not None:
            ax.plot([rec], [vals[rec]], marker="*", markersize=14, color="tab:red", linestyle="none",
                    label=f"recommended rank {rec}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("rank b" + (" (allocations: average rank at equal parameters)" if result.allocations else ""))
        better = "higher" if result.higher_is_better.get(metric, value(metric).higher_is_better) else "lower"
        ax.set_ylabel(f"{value(metric).label} ({better} is better)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


def _yerr(result: SweepResult, metric: str, entries: Sequence[Entry]) -> list[list[float]]:
    """(2, k) distances from each value down and up to its interval's ends, for errorbar."""
    spans = [result.intervals.get(metric, {}).get(r, (math.nan, math.nan)) for r in entries]
    vals = [result.values[metric][r] for r in entries]
    return [[max(v - lo, 0.0) if not math.isnan(lo) else 0.0 for v, (lo, _) in zip(vals, spans)],
            [max(hi - v, 0.0) if not math.isnan(hi) else 0.0 for v, (_, hi) in zip(vals, spans)]]


def table(result: SweepResult) -> str:
    """The sweep as a plain-text table (rank 0 is the base model): each value and its interval
    ("1.0597 [0.9169, 1.2025]"; a 0/1 score's is asymmetric: "0.00 [0.00, 10.72]"), losses to 4
    decimals, scores (percent) to 2, "@n" where an entry was measured on fewer rows than the others
    (decided early); long lm-eval names are shortened to TASK:METRIC."""
    cols = list(result.values)
    names = [c.removeprefix("lm_eval:") for c in cols]
    cells = {c: {r: _cell(result, c, r) for r in result.ranks} for c in cols}
    width = max([12, *(len(n) for n in names), *(len(x) for by in cells.values() for x in by.values())])
    first = max([6, *(len(str(a)) for a in result.allocations)])
    sized = bool(result.allocations)  # a params column when allocations stand beside the ranks
    head = f"{'rank':>{first}}  " + (f"{'params':>12}  " if sized else "") + "  ".join(f"{n:>{width}}" for n in names)
    lines = [head, "-" * len(head)]
    guess = {m for m, d in result.decisions.items() if not d.sure}  # picks the rows do not back
    for r in result.ranks:
        marks = [m.removeprefix("lm_eval:") + (": a guess" if m in guess else "")
                 for m, rec in result.recommended.items() if rec == r]
        marks += [f"smallest by {m.removeprefix('lm_eval:')}" for m, name in result.smallest.items()
                  if name == str(r) and isinstance(r, Allocation)]
        row = "  ".join(f"{cells[c][r]:>{width}}" for c in cols)
        name = "base" if r == 0 else str(r)
        size = f"{result.params.get(r, 0):>12,}  " if sized else ""
        lines.append(f"{name:>{first}}  {size}{row}" + (f"   <- recommended ({', '.join(marks)})" if marks else ""))
    note = f"[low, high]: the {result.confidence:.0%} interval over rows"
    if any("@" in x for by in cells.values() for x in by.values()):
        note += "; @n: measured on n rows only (decided early; --exhaustive measures every rank on every row)"
    return "\n".join([*lines, note])


def _cell(result: SweepResult, name: str, entry: Entry) -> str:
    places = 4 if name in VALUES and not VALUES[name].higher_is_better else 2  # losses to 4 decimals
    v = result.values[name][entry]
    low, high = result.intervals.get(name, {}).get(entry, (math.nan, math.nan))
    text = f"{v:.{places}f}" + (f" [{low:.{places}f}, {high:.{places}f}]" if not math.isnan(high - low) else "")
    rows = result.rows.get(name, {})
    if rows and rows.get(entry, 0) < max(rows.values()):
        text += f" @{rows[entry]}"
    return text
