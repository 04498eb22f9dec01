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
from typing import Optional, Sequence, Union

import torch

from ..core.allocation import DEFAULT_CALIBRATION_ROWS, DEFAULT_SCORE, Allocation, layer_costs
from ..core.model import QDyLoRAModel
from ..core.rank import evaluating
from ..data.batching import fixed_batches, pad_token_id
from ..data.embedded import EVAL_TEMPLATES
from ..data.rows import (EMBEDDED_PREFIX, generation_prompts, read_rows, row_format, run_rows, split_references,
                         tokenize)
from ..errors import QDyLoRAError
from ..files import atomic_write
from ..training.losses import autocast_context, losses_at_ranks
from ..training.rundir import load_run, read_json
from ..training.sampling import check_ranks
from ..training.settings import DataSettings, RunSettings
from .choice import choice_accuracy, choice_examples, choice_logliks, choice_questions, few_shot
from .generation import generate_at_ranks
from .text_metrics import ROUGE_TYPES, bleu, exact_match, rouge

# What `--metrics` takes (the values each reports: `SweepResult`).
METRICS = ("loss", "exact_match", "choice", "rouge", "bleu")
GENERATED = ("exact_match", "rouge", "bleu")  # metrics of one shared greedy generation
SWEEP_FILES = {"json": "sweep.json", "csv": "sweep.csv", "png": "sweep.png"}
LOWER_IS_BETTER = ("loss", "perplexity")
NOT_RECOMMENDED = ("perplexity",)  # the same ranking as loss


Entry = Union[int, Allocation]  # a uniform rank, or per-layer ranks (`core.allocation`)


@dataclass
class SweepResult:
    """Per-value scores at each rank (rank 0 = base model) and the recommended rank of each.

    values: "loss" (mean response-token loss), "perplexity", "exact_match", "acc", "acc_norm",
    "rouge1", "rouge2", "rougeL", "bleu" (percent), and "lm_eval:TASK:METRIC" (as the harness
    reports them; fractions in [0, 1] as percent). `ranks` may hold allocations after the
    uniform ranks (keyed by their name in files); `params` is each entry's adapter size, and
    `smallest` the smallest entry by parameters within the tolerance of the best (with
    allocations)."""

    ranks: list[Entry]
    values: dict[str, dict[Entry, float]]
    recommended: dict[str, int]
    examples: int
    seconds: dict[str, float] = field(default_factory=dict)
    samples: dict[Entry, list[str]] = field(default_factory=dict)  # first generations per rank
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    params: dict[Entry, int] = field(default_factory=dict)
    smallest: dict[str, str] = field(default_factory=dict)

    @property
    def allocations(self) -> list[Allocation]:
        return [r for r in self.ranks if isinstance(r, Allocation)]

    def to_dict(self) -> dict:
        return {
            "ranks": [str(r) if isinstance(r, Allocation) else r for r in self.ranks],
            "examples": self.examples,
            "values": {m: {str(r): v for r, v in vals.items()} for m, vals in self.values.items()},
            "recommended": self.recommended,
            **({"smallest": self.smallest} if self.smallest else {}),
            "params": {str(r): n for r, n in self.params.items()},
            "higher_is_better": self.higher_is_better,
            "seconds": self.seconds,
            "samples": {str(r): s for r, s in self.samples.items()},
        }

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        metrics = list(self.values)
        writer.writerow(["rank", "params", *metrics])
        for r in self.ranks:
            writer.writerow([r, self.params.get(r, ""), *(f"{self.values[m][r]:.6g}" for m in metrics)])
        return buf.getvalue()


def default_ranks(max_rank: int) -> list[int]:
    """0 (the base) and the powers of two up to max_rank, plus max_rank itself."""
    return sorted({0, max_rank} | {2**k for k in range(max_rank.bit_length()) if 2**k <= max_rank})


def recommend(values: dict[Entry, float], higher_is_better: bool, tolerance: float, relative: bool,
              size: Optional[dict[Entry, int]] = None) -> Entry:
    """The smallest rank (> 0) within `tolerance` of the best rank's value: relative (a fraction
    of the best) for losses, absolute (points) for accuracies. With `size` (parameters of each
    entry) allocations compete too and the smallest by size wins; without, uniform ranks only."""
    adapted = {r: v for r, v in values.items()
               if (size is not None or isinstance(r, int)) and r != 0 and not math.isnan(v)}
    if not adapted:
        raise QDyLoRAError("no rank above 0 was measured")
    best = max(adapted.values()) if higher_is_better else min(adapted.values())
    slack = abs(best) * tolerance if relative else tolerance
    good = [r for r, v in adapted.items() if (v >= best - slack if higher_is_better else v <= best + slack)]
    return min(good, key=lambda r: (size[r], str(r))) if size is not None else min(good)


def eval_rows(settings: RunSettings, data: Optional[str]) -> list[dict]:
    """Rows to evaluate: `data` if given; for a run on the embedded ASDiv, its test split; else
    the run's own validation rows (recomputed from the run's settings and seed)."""
    d = settings.data
    if data is not None:
        return read_rows(data, d.split)
    if d.data == f"{EMBEDDED_PREFIX}train":
        return read_rows(f"{EMBEDDED_PREFIX}test")
    _, _, val_rows, val_idx = run_rows(d, settings.adapter.seed)
    if not val_idx:
        raise QDyLoRAError("the run held out no validation rows: pass --data EVAL_FILE")
    return [val_rows[i] for i in val_idx]


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


def check_metrics(metrics: Sequence[str]) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise QDyLoRAError(f"unknown metric {unknown[0]!r}: use {', '.join(METRICS)}")
    if not metrics:
        raise QDyLoRAError(f"no metric to measure: use one or more of {', '.join(METRICS)}")


def run_sweep(
    model: QDyLoRAModel,
    tokenizer,
    rows: Sequence[dict],
    data: DataSettings,
    ranks: Sequence[Entry],
    metrics: Sequence[str] = ("loss", "exact_match"),
    *,
    batch_size: int = 8,
    rank_batch: int = 0,
    max_new_tokens: int = 32,
    loss_tolerance: float = 0.01,
    accuracy_tolerance: float = 0.5,
    shots: int = 0,
    shots_rows: Optional[Sequence[dict]] = None,
    lm_eval: Sequence[str] = (),
    lm_eval_include: Optional[str | Path] = None,
    lm_eval_limit: Optional[int] = None,
    progress: bool = True,
) -> SweepResult:
    """Measure `metrics` (and lm-evaluation-harness `lm_eval` tasks) at every rank of `ranks` (0 is
    added; allocations are measured beside the ranks, in the same batches) on `rows`, formatted as
    in training; `shots` solved questions lead each `choice` prompt."""
    for name, value in (("loss_tolerance", loss_tolerance), ("accuracy_tolerance", accuracy_tolerance)):
        if not 0 <= value < float("inf"):  # false for nan too
            raise QDyLoRAError(f"{name} must be a finite number, not negative, got {value}")
    if metrics or not lm_eval:
        check_metrics(metrics)
    allocations = list(dict.fromkeys(r for r in ranks if isinstance(r, Allocation)))
    ints = [r for r in ranks if not isinstance(r, Allocation)]
    check_ranks([r for r in ints if r != 0], model.qdylora_config.max_rank)  # 0, the base, is always measured
    ranks = sorted(set(ints) | {0}) + allocations
    if not rows and metrics:
        raise QDyLoRAError("the evaluation data is empty")
    manager = None
    if lm_eval:
        from .harness import task_manager

        manager = task_manager(lm_eval, lm_eval_include)  # an unknown task or no harness: before any work
    ctx = _Context(model, tokenizer, list(ranks), batch_size, rank_batch, progress)
    rf = row_format(data, rows[0].keys(), data.data or "the evaluation data") if any(
        m in metrics for m in ("loss", *GENERATED)) else None
    values: dict[str, dict[int, float]] = {}
    samples: dict[int, list[str]] = {}
    with evaluating(model):
        if "loss" in metrics:
            values.update(ctx.timed("loss", lambda: _loss_values(ctx, rows, rf, data)))
        if any(m in metrics for m in GENERATED):
            generated, samples = ctx.timed("generation", lambda: _generated_values(
                ctx, rows, rf, data, [m for m in GENERATED if m in metrics], max_new_tokens))
            values.update(generated)
        if "choice" in metrics:
            values.update(ctx.timed("choice", lambda: _choice_values(ctx, rows, data, shots, shots_rows)))
        higher = {v: v not in LOWER_IS_BETTER for v in values}
        if lm_eval:
            harness, harness_higher = ctx.timed("lm_eval", lambda: _harness_values(
                ctx, lm_eval, manager, lm_eval_limit))
            values.update(harness)
            higher.update(harness_higher)
    tolerances = {v: (loss_tolerance, True) if not higher[v] else (accuracy_tolerance, False) for v in values}
    recommended = {v: recommend(vals, higher[v], *tolerances[v]) for v, vals in values.items() if v not in NOT_RECOMMENDED}
    costs = layer_costs(model)
    params = {r: r.params(costs) if isinstance(r, Allocation) else r * sum(costs.values()) for r in ranks}
    smallest = {v: str(recommend(vals, higher[v], *tolerances[v], size=params))
                for v, vals in values.items() if v not in NOT_RECOMMENDED} if allocations else {}
    return SweepResult(ranks, values, recommended, len(rows), ctx.seconds, samples, higher, params, smallest)


@dataclass
class _Context:
    """What every metric of one sweep shares: the model, its device and dtype, the ranks."""

    model: QDyLoRAModel
    tokenizer: object
    ranks: list[int]
    batch_size: int
    rank_batch: int
    progress: bool
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = next(self.model.parameters()).device
        dtype = self.model.qdylora_config.torch_compute_dtype
        self.autocast = lambda: autocast_context(self.device, dtype, dtype != torch.float32)
        self.pad_id = pad_token_id(self.tokenizer)
        self.chunks = math.ceil(len(self.ranks) / (self.rank_batch or len(self.ranks)))

    def bar(self, batches: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=batches * self.chunks, desc=desc, unit="batch", disable=not self.progress)

    def timed(self, name: str, work):
        start = time.perf_counter()
        result = work()
        self.seconds[name] = time.perf_counter() - start
        return result


def _loss_values(ctx: _Context, rows, rf, data: DataSettings) -> dict[str, dict[int, float]]:
    """Mean response-token loss (of the first reference where a row has several) and perplexity."""
    rows = [split_references(row, i, rf)[0] for i, row in enumerate(rows)]
    examples, _ = tokenize(rows, ctx.tokenizer, rf, max_source_length=data.max_source_length,
                           max_target_length=data.max_target_length)
    if not examples:
        raise QDyLoRAError("no evaluation example is left after tokenization")
    batches = fixed_batches(examples, ctx.batch_size)
    with ctx.bar(len(batches), "loss") as bar:
        sums = losses_at_ranks(ctx.model, batches, ctx.ranks, ctx.pad_id, ctx.device, ctx.rank_batch,
                               ctx.autocast, on_batch=lambda k: bar.update(1))
    loss = {r: s / max(c, 1) for r, (s, c) in sums.items()}
    return {"loss": loss, "perplexity": {r: math.exp(min(v, 50.0)) for r, v in loss.items()}}


def _generated_values(ctx: _Context, rows, rf, data: DataSettings, metrics: list[str],
                      max_new_tokens: int) -> tuple[dict[str, dict[int, float]], dict[int, list[str]]]:
    """exact_match, rouge and bleu of one greedy generation per row and rank."""
    prompts, refs = generation_prompts(rows, ctx.tokenizer, rf, max_source_length=data.max_source_length)
    with ctx.bar(math.ceil(len(prompts) / ctx.batch_size), "generation") as bar, ctx.autocast():
        outputs = generate_at_ranks(ctx.model, ctx.tokenizer, prompts, ctx.ranks, batch_size=ctx.batch_size,
                                    max_new_tokens=max_new_tokens, rank_batch=ctx.rank_batch,
                                    device=ctx.device, on_batch=lambda k: bar.update(1))
    values: dict[str, dict[int, float]] = {}
    if "exact_match" in metrics:
        values["exact_match"] = {r: exact_match(outs, refs) for r, outs in outputs.items()}
    if "rouge" in metrics:
        by_rank = {r: rouge(outs, refs) for r, outs in outputs.items()}
        values.update({kind: {r: by_rank[r][kind] for r in outputs} for kind in ROUGE_TYPES})
    if "bleu" in metrics:
        values["bleu"] = {r: bleu(outs, refs) for r, outs in outputs.items()}
    return values, {r: outs[:3] for r, outs in outputs.items()}


def _choice_values(ctx: _Context, rows, data: DataSettings, shots: int,
                   shots_rows: Optional[Sequence[dict]]) -> dict[str, dict[int, float]]:
    """acc and acc_norm: every option of every question scored in the same rank-batched passes."""
    solved, rows, first = few_shot(rows, shots, shots_rows)
    questions = choice_questions(rows, first_row=first)
    chat = data.chat_template and data.format != "text"
    examples = choice_examples(questions, ctx.tokenizer, chat=chat, shots=solved,
                               max_length=data.max_source_length + data.max_target_length)
    with ctx.bar(math.ceil(len(examples) / ctx.batch_size), "choice") as bar:
        logliks = choice_logliks(ctx.model, examples, ctx.ranks, pad_id=ctx.pad_id, batch_size=ctx.batch_size,
                                 rank_batch=ctx.rank_batch, autocast=ctx.autocast,
                                 on_batch=lambda k: bar.update(1))
    by_rank = {r: choice_accuracy(ll, questions) for r, ll in logliks.items()}
    return {kind: {r: by_rank[r][kind] for r in by_rank} for kind in ("acc", "acc_norm")}


def _harness_values(ctx: _Context, tasks: Sequence[str], manager, limit) -> tuple[dict, dict[str, bool]]:
    """lm-evaluation-harness scores as "lm_eval:TASK:METRIC" values; fractions become percent."""
    from tqdm.auto import tqdm

    from .harness import harness_at_ranks

    with tqdm(total=len(ctx.ranks), desc="lm-eval", unit="rank", disable=not ctx.progress) as bar:
        scores, higher = harness_at_ranks(ctx.model, ctx.tokenizer, tasks, ctx.ranks, manager=manager, limit=limit,
                                          batch_size=ctx.batch_size, on_rank=lambda r: bar.update(1))
    values: dict[str, dict[int, float]] = {}
    for r, by_task in scores.items():
        for task, metrics in by_task.items():
            for metric, value in metrics.items():
                values.setdefault(f"lm_eval:{task}:{metric}", {})[r] = value
    directions = {}
    for name, vals in values.items():
        _, task, metric = name.split(":", 2)
        if all(0.0 <= v <= 1.0 for v in vals.values()):
            values[name] = {r: 100.0 * v for r, v in vals.items()}
        directions[name] = higher.get(task, {}).get(metric.split("[")[0], True)
    return values, directions


def sweep_run(run_dir: str | Path, *, data: Optional[str] = None, ranks: Optional[Sequence[int]] = None,
              metrics: Sequence[str] = ("loss", "exact_match"), max_examples: int = 0,
              out: Optional[str | Path] = None, overwrite: bool = False, device: Optional[str] = None,
              trust_remote_code: bool = False, title: Optional[str] = None,
              prompt_template: Optional[str] = None, response_template: Optional[str] = None,
              shots_data: Optional[str] = None, budgets: Sequence[str] = (), scores: Sequence[str] = (DEFAULT_SCORE,),
              calibration_rows: int = DEFAULT_CALIBRATION_ROWS, **options) -> tuple[SweepResult, dict[str, Path]]:
    """Open a training run, measure it at `ranks` (default: powers of two up to max_rank; the base
    always) on `data` (default: `eval_rows`), and write sweep.json, sweep.csv and sweep.png into
    `out` (default: the run directory). With `budgets`, per-layer allocations at each budget under
    each of `scores` are measured beside the ranks (made once, kept in RUN/allocations/).
    `options` go to `run_sweep`."""
    from .budgets import AllocationRequest

    requests = [AllocationRequest(budget=str(b), score=s, calibration_rows=calibration_rows)
                for b in budgets for s in scores]  # malformed budgets and scores fail before loading
    out = Path(out or run_dir)
    existing = [n for n in SWEEP_FILES.values() if (out / n).exists()]
    if existing and not overwrite:
        raise QDyLoRAError(f"{out} already holds {', '.join(existing)}: use --overwrite or another --out")
    if metrics or not options.get("lm_eval"):
        check_metrics(metrics)
    model, tokenizer, settings = load_run(run_dir, device, trust_remote_code)
    fmt = eval_format(settings.data, data, prompt_template, response_template)
    rows = eval_rows(settings, data)
    if max_examples > 0:
        rows = rows[:max_examples]
    shots_rows = read_rows(shots_data, settings.data.split) if shots_data else None
    allocations = [r.resolve(run_dir, model, tokenizer, settings, batch_size=options.get("batch_size", 8),
                             progress=options.get("progress", True)) for r in requests]
    result = run_sweep(model, tokenizer, rows, fmt, list(ranks or default_ranks(model.qdylora_config.max_rank))
                       + allocations, metrics, shots_rows=shots_rows, **options)
    out.mkdir(parents=True, exist_ok=True)
    title = title or f"{run_dir} on {data or 'its validation rows'} ({result.examples} examples)"
    return result, write_outputs(result, out, title=title)


def recommended_rank(run_dir: str | Path, max_rank: int) -> int:
    """The rank a run's sweep.json recommends (by exact match, else choice accuracy, else loss),
    else max_rank."""
    sweep_file = Path(run_dir) / SWEEP_FILES["json"]
    recommended = read_json(sweep_file).get("recommended", {}) if sweep_file.is_file() else {}
    for metric in ("exact_match", "acc", "loss"):
        if metric in recommended:
            return recommended[metric]
    return max_rank


def write_outputs(result: SweepResult, out: Path, title: str = "") -> dict[str, Path]:
    """sweep.json, sweep.csv and sweep.png in `out`, each written atomically."""
    import json

    paths = {kind: out / name for kind, name in SWEEP_FILES.items()}
    with atomic_write(paths["json"]) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    with atomic_write(paths["csv"]) as tmp:
        tmp.write_text(result.csv())
    with atomic_write(paths["png"]) as tmp:
        plot(result, tmp, title)
    return paths


LABELS = {"loss": "response token loss", "exact_match": "exact match, %", "acc": "choice accuracy, %",
          "acc_norm": "choice accuracy (length-normalised), %", "rouge1": "ROUGE-1 F1, %",
          "rouge2": "ROUGE-2 F1, %", "rougeL": "ROUGE-L F1, %", "bleu": "BLEU"}


def plot(result: SweepResult, path: Path, title: str = "") -> None:
    """Each metric against rank (log2 axis), three panels a row; the base model (rank 0) as a
    dashed line and the recommended rank marked; allocations at their average rank (parameters
    over those of rank 1), one line per score."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    shown = [m for m in result.values if m not in NOT_RECOMMENDED]
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(5 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax, metric in zip(axes, shown):
        vals = result.values[metric]
        xs = [r for r in result.ranks if isinstance(r, int) and r > 0]
        ax.plot(xs, [vals[r] for r in xs], marker="o", label="QDyLoRA adapter at rank b")
        per_rank = result.params.get(1) or (result.params[xs[0]] / xs[0] if xs and result.params else None)
        for score in dict.fromkeys(a.name.split("-")[0] for a in result.allocations):
            group = sorted((a for a in result.allocations if a.name.split("-")[0] == score),
                           key=lambda a: result.params[a])
            ax.plot([result.params[a] / per_rank for a in group], [vals[a] for a in group], marker="s",
                    linestyle="--", label=f"per-layer ranks ({score} score), at their average rank")
        ax.axhline(vals[0], linestyle="--", color="gray", label="base model (rank 0)")
        rec = result.recommended.get(metric)
        if rec is not None:
            ax.plot([rec], [vals[rec]], marker="*", markersize=14, color="tab:red", linestyle="none",
                    label=f"recommended rank {rec}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("rank b" + (" (allocations: average rank at equal parameters)" if result.allocations else ""))
        better = "higher" if result.higher_is_better.get(metric, metric not in LOWER_IS_BETTER) else "lower"
        ax.set_ylabel(f"{LABELS.get(metric, metric)} ({better} is better)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


def table(result: SweepResult) -> str:
    """The sweep as a plain-text table (rank 0 is the base model): losses to 4 decimals, scores
    (percent) to 2; long lm-eval names are shortened to TASK:METRIC."""
    cols = list(result.values)
    names = [c.removeprefix("lm_eval:") for c in cols]
    width = max([12, *(len(n) for n in names)])
    first = max([6, *(len(str(a)) for a in result.allocations)])
    sized = bool(result.allocations)  # a params column when allocations stand beside the ranks
    head = f"{'rank':>{first}}  " + (f"{'params':>12}  " if sized else "") + "  ".join(f"{n:>{width}}" for n in names)
    lines = [head, "-" * len(head)]
    for r in result.ranks:
        marks = [m.removeprefix("lm_eval:") for m, rec in result.recommended.items() if rec == r]
        marks += [f"smallest by {m.removeprefix('lm_eval:')}" for m, name in result.smallest.items()
                  if name == str(r) and isinstance(r, Allocation)]
        cells = "  ".join(f"{result.values[c][r]:>{width}.{4 if c in LOWER_IS_BETTER else 2}f}" for c in cols)
        name = "base" if r == 0 else str(r)
        size = f"{result.params.get(r, 0):>12,}  " if sized else ""
        lines.append(f"{name:>{first}}  {size}{cells}" + (f"   <- recommended ({', '.join(marks)})" if marks else ""))
    return "\n".join(lines)
