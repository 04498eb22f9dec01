"""The rank sweep: quality of one trained adapter at every requested rank, and the smallest
rank that is good enough.

Rank 0 (the base model without adapter) is always measured as the reference row.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..core.model import QDyLoRAModel
from ..core.rank import evaluating
from ..data.batching import fixed_batches, pad_token_id
from ..data.rows import EMBEDDED_PREFIX, generation_prompts, read_rows, row_format, run_rows, tokenize
from ..errors import QDyLoRAError
from ..files import atomic_write
from ..training.losses import autocast_context, losses_at_ranks
from ..training.rundir import load_run, read_json
from ..training.sampling import check_ranks
from ..training.settings import DataSettings, RunSettings
from .answers import is_correct
from .generation import generate_at_ranks

METRICS = ("loss", "exact_match")
SWEEP_FILES = {"json": "sweep.json", "csv": "sweep.csv", "png": "sweep.png"}
HIGHER_IS_BETTER = {"loss": False, "exact_match": True}


@dataclass
class SweepResult:
    """Per-metric values at each rank (rank 0 = base model) and the recommended ranks."""

    ranks: list[int]
    values: dict[str, dict[int, float]]  # "loss" (mean token loss), "perplexity", "exact_match" (%)
    recommended: dict[str, int]
    examples: int
    seconds: dict[str, float] = field(default_factory=dict)
    samples: dict[int, list[str]] = field(default_factory=dict)  # first generations per rank

    def to_dict(self) -> dict:
        return {
            "ranks": self.ranks,
            "examples": self.examples,
            "values": {m: {str(r): v for r, v in vals.items()} for m, vals in self.values.items()},
            "recommended": self.recommended,
            "seconds": self.seconds,
            "samples": {str(r): s for r, s in self.samples.items()},
        }

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        metrics = list(self.values)
        writer.writerow(["rank", *metrics])
        for r in self.ranks:
            writer.writerow([r, *(f"{self.values[m][r]:.6g}" for m in metrics)])
        return buf.getvalue()


def default_ranks(max_rank: int) -> list[int]:
    """0 (the base) and the powers of two up to max_rank, plus max_rank itself."""
    return sorted({0, max_rank} | {2**k for k in range(max_rank.bit_length()) if 2**k <= max_rank})


def recommend(values: dict[int, float], higher_is_better: bool, tolerance: float, relative: bool) -> int:
    """The smallest rank (> 0) within `tolerance` of the best rank's value: relative (a fraction
    of the best) for losses, absolute (points) for accuracies."""
    adapted = {r: v for r, v in values.items() if r > 0 and not math.isnan(v)}
    if not adapted:
        raise QDyLoRAError("no rank above 0 was measured")
    best = max(adapted.values()) if higher_is_better else min(adapted.values())
    slack = abs(best) * tolerance if relative else tolerance
    good = [r for r, v in adapted.items() if (v >= best - slack if higher_is_better else v <= best + slack)]
    return min(good)


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


def run_sweep(
    model: QDyLoRAModel,
    tokenizer,
    rows: Sequence[dict],
    data: DataSettings,
    ranks: Sequence[int],
    metrics: Sequence[str] = METRICS,
    *,
    batch_size: int = 8,
    rank_batch: int = 0,
    max_new_tokens: int = 32,
    loss_tolerance: float = 0.01,
    accuracy_tolerance: float = 0.5,
    progress: bool = True,
) -> SweepResult:
    """Measure `metrics` at every rank of `ranks` (0 is added) on `rows`, formatted as in training."""
    from tqdm.auto import tqdm

    for name, value in (("loss_tolerance", loss_tolerance), ("accuracy_tolerance", accuracy_tolerance)):
        if not 0 <= value < float("inf"):  # false for nan too
            raise QDyLoRAError(f"{name} must be a finite number, not negative, got {value}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise QDyLoRAError(f"unknown metric {unknown[0]!r}: use {', '.join(METRICS)}")
    check_ranks([r for r in ranks if r != 0], model.config.max_rank)  # 0, the base, is always measured
    ranks = sorted(set(ranks) | {0})
    if not rows:
        raise QDyLoRAError("the evaluation data is empty")
    rf = row_format(data, rows[0].keys(), data.data or "the evaluation data")
    device = next(model.parameters()).device
    dtype = model.config.torch_compute_dtype
    autocast = lambda: autocast_context(device, dtype, dtype != torch.float32)  # noqa: E731
    pad_id = pad_token_id(tokenizer)
    group = rank_batch if rank_batch > 0 else len(ranks)
    chunks = math.ceil(len(ranks) / group)
    values: dict[str, dict[int, float]] = {}
    seconds: dict[str, float] = {}
    samples: dict[int, list[str]] = {}
    with evaluating(model):
        if "loss" in metrics:
            examples, _ = tokenize(rows, tokenizer, rf, max_source_length=data.max_source_length,
                                   max_target_length=data.max_target_length)
            if not examples:
                raise QDyLoRAError("no evaluation example is left after tokenization")
            batches = fixed_batches(examples, batch_size)
            bar = tqdm(total=len(batches) * chunks, desc="loss", unit="batch", disable=not progress)
            start = time.perf_counter()
            sums = losses_at_ranks(model, batches, ranks, pad_id, device, rank_batch, autocast,
                                   on_batch=lambda k: bar.update(1))
            seconds["loss"] = time.perf_counter() - start
            bar.close()
            values["loss"] = {r: s / max(c, 1) for r, (s, c) in sums.items()}
            values["perplexity"] = {r: math.exp(min(v, 50.0)) for r, v in values["loss"].items()}
        if "exact_match" in metrics:
            prompts, refs = generation_prompts(rows, tokenizer, rf, max_source_length=data.max_source_length)
            n_batches = math.ceil(len(prompts) / batch_size)
            bar = tqdm(total=n_batches * chunks, desc="exact_match", unit="batch", disable=not progress)
            start = time.perf_counter()
            with autocast():
                outputs = generate_at_ranks(model, tokenizer, prompts, ranks, batch_size=batch_size,
                                            max_new_tokens=max_new_tokens, rank_batch=rank_batch,
                                            device=device, on_batch=lambda k: bar.update(1))
            seconds["exact_match"] = time.perf_counter() - start
            bar.close()
            values["exact_match"] = {
                r: 100.0 * sum(is_correct(o, ref) for o, ref in zip(outs, refs)) / len(refs)
                for r, outs in outputs.items()
            }
            samples = {r: outs[:3] for r, outs in outputs.items()}
    recommended = {}
    if "loss" in values:
        recommended["loss"] = recommend(values["loss"], HIGHER_IS_BETTER["loss"], loss_tolerance, relative=True)
    if "exact_match" in values:
        recommended["exact_match"] = recommend(values["exact_match"], HIGHER_IS_BETTER["exact_match"],
                                               accuracy_tolerance, relative=False)
    return SweepResult(ranks, values, recommended, len(rows), seconds, samples)


def sweep_run(run_dir: str | Path, *, data: Optional[str] = None, ranks: Optional[Sequence[int]] = None,
              metrics: Sequence[str] = METRICS, max_examples: int = 0, out: Optional[str | Path] = None,
              overwrite: bool = False, device: Optional[str] = None, trust_remote_code: bool = False,
              title: Optional[str] = None, **options) -> tuple[SweepResult, dict[str, Path]]:
    """Open a training run, measure it at `ranks` (default: powers of two up to max_rank; the base
    always) on `data` (default: `eval_rows`), and write sweep.json, sweep.csv and sweep.png into
    `out` (default: the run directory). `options` go to `run_sweep`."""
    out = Path(out or run_dir)
    existing = [n for n in SWEEP_FILES.values() if (out / n).exists()]
    if existing and not overwrite:
        raise QDyLoRAError(f"{out} already holds {', '.join(existing)}: use --overwrite or another --out")
    model, tokenizer, settings = load_run(run_dir, device, trust_remote_code)
    rows = eval_rows(settings, data)
    if max_examples > 0:
        rows = rows[:max_examples]
    result = run_sweep(model, tokenizer, rows, settings.data, ranks or default_ranks(model.config.max_rank),
                       metrics, **options)
    out.mkdir(parents=True, exist_ok=True)
    title = title or f"{run_dir} on {data or 'its validation rows'} ({result.examples} examples)"
    return result, write_outputs(result, out, title=title)


def recommended_rank(run_dir: str | Path, max_rank: int) -> int:
    """The rank a run's sweep.json recommends (by exact match, else by loss), else max_rank."""
    sweep_file = Path(run_dir) / SWEEP_FILES["json"]
    recommended = read_json(sweep_file).get("recommended", {}) if sweep_file.is_file() else {}
    return recommended.get("exact_match", recommended.get("loss", max_rank))


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


def plot(result: SweepResult, path: Path, title: str = "") -> None:
    """Each metric against rank (log2 axis); the base model (rank 0) as a dashed line and the
    recommended rank marked."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    shown = [m for m in ("loss", "exact_match") if m in result.values]
    fig = Figure(figsize=(5 * len(shown), 3.6))
    axes = fig.subplots(1, len(shown), squeeze=False)
    labels = {"loss": "response token loss (lower is better)", "exact_match": "exact match, % (higher is better)"}
    for ax, metric in zip(axes[0], shown):
        vals = result.values[metric]
        xs = [r for r in result.ranks if r > 0]
        ax.plot(xs, [vals[r] for r in xs], marker="o", label="QDyLoRA adapter at rank b")
        ax.axhline(vals[0], linestyle="--", color="gray", label="base model (rank 0)")
        rec = result.recommended.get(metric)
        if rec is not None:
            ax.plot([rec], [vals[rec]], marker="*", markersize=14, color="tab:red", linestyle="none",
                    label=f"recommended rank {rec}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("rank b")
        ax.set_ylabel(labels[metric])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


def table(result: SweepResult) -> str:
    """The sweep as a plain-text table (rank 0 is the base model)."""
    cols = [m for m in ("loss", "perplexity", "exact_match") if m in result.values]
    head = f"{'rank':>6}  " + "  ".join(f"{c:>12}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in result.ranks:
        marks = [m for m, rec in result.recommended.items() if rec == r]
        cells = "  ".join(f"{result.values[c][r]:>12.4f}" if c != "exact_match" else f"{result.values[c][r]:>11.1f}%"
                          for c in cols)
        name = "base" if r == 0 else str(r)
        lines.append(f"{name:>6}  {cells}" + (f"   <- recommended ({', '.join(marks)})" if marks else ""))
    return "\n".join(lines)
