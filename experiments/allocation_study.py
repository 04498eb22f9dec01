"""The allocation study: per-layer ranks under a budget against uniform ranks at equal size, and
the data-aware orders against the SVD order, on default runs of the recipe study.

    .venv/bin/python experiments/recipe_study.py --task asdiv --runs full-svd,qlora-r1 --seeds 0,1,2
    .venv/bin/python experiments/allocation_study.py --task asdiv --seeds 0,1,2
    .venv/bin/python experiments/allocation_study.py --report     # tables into docs/rank-study.md

For each finished default run (one rank-64 run, SVD order; `recipe-study/runs/<task>-full-svd-seed<s>`):

1. calibration: G (forward) and P (backward) on --calibration-rows training rows, timed, kept in
   the run directory as `qdylora` keeps it (RUN/calibration.safetensors);
2. allocations at average ranks --budgets (the parameter count of uniform rank b) under the three
   scores svd (PARA's singular values), output (output-error energy) and loss (K-FAC), kept as
   RUN/allocations/<score>-r<b>.json;
3. test answer loss on --test-rows rows at uniform ranks 1-64, every allocation, and the two
   data-aware orders (output, loss) at uniform ranks and under their own allocations (those
   recalibrated on the reordered factors, same rows).

Results: experiments/allocation-study/results/<task>-seed<s>.json; the training runs' own result
files (test loss at ranks 1, 8, 64, training time; QLoRA rank 1 on ASDiv) in
experiments/allocation-study/trained/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
SCORES = ("svd", "output", "loss")
RESULTS = ROOT / "allocation-study" / "results"
# the recipe study's result files of the runs this study used (copied from its --out results/)
TRAINED = ROOT / "allocation-study" / "trained"


def study_run(task: str, seed: int, args) -> dict:
    import torch

    from qdylora.core.allocation import Allocation, allocate
    from qdylora.data.batching import pad_token_id
    from qdylora.core.ordering import order_by_grams
    from qdylora.core.allocation import layer_costs
    from qdylora.evaluation.budgets import allocate_run, run_statistics
    from qdylora.evaluation.settings import SweepSettings
    from qdylora.evaluation.sweep import run_sweep
    from qdylora.training.calibration import calibrate, calibration_batches, layer_errors, layer_grams
    from qdylora.training.rundir import load_run, read_json
    from qdylora.training.trainer import load_data
    from recipe_study import test_rows

    run = Path(args.runs) / f"{task}-full-svd-seed{seed}"
    model, tokenizer, settings = load_run(run)
    data = settings.data.with_embedded_default()
    rows = test_rows(task, args.test_rows)
    costs = layer_costs(model)
    train_seconds = read_json(run / "summary.json")["seconds"]
    result = {"task": task, "seed": seed, "test_rows": len(rows), "calibration_rows": args.calibration_rows,
              "train_seconds": train_seconds, "layers": len(costs), "rank1_params": sum(costs.values())}

    # 1. calibration, timed: with gradients (serves both data-aware scores) and forward only
    (run / "calibration.safetensors").unlink(missing_ok=True)
    start = time.perf_counter()
    stats = run_statistics(run, model, tokenizer, settings, rows=args.calibration_rows, gradients=True)
    result["calibration_seconds"] = time.perf_counter() - start
    examples = load_data(replace(settings, data=data), tokenizer).train
    device = next(model.parameters()).device
    batches = calibration_batches(examples, args.calibration_rows, settings.adapter.seed, 8,
                                  pad_token_id(tokenizer), device)
    start = time.perf_counter()
    calibrate(model, batches, gradients=False)
    result["calibration_forward_seconds"] = time.perf_counter() - start
    result["calibration_tokens"] = stats.tokens

    # 2. allocations under each score, kept in the run directory
    allocations = {(score, b): allocate_run(run, model, tokenizer, settings, str(b), score,
                                            calibration_rows=args.calibration_rows)
                   for score in SCORES for b in args.budgets}
    result["allocations"] = {a.name: {"params": a.params(costs), "max": a.max_rank,
                                      "off": sum(r == 0 for _, r in a.ranks)} for a in allocations.values()}
    uniform = [r for r in (1, 2, 4, 8, 16, 32, 64)]

    def losses(ranks) -> dict[str, float]:
        values = run_sweep(model, tokenizer, rows, data, ranks,
                           SweepSettings(metrics="loss", rank_batch=args.rank_batch), progress=False).values["loss"]
        return {str(r): v for r, v in values.items()}

    start = time.perf_counter()
    result["loss"] = losses(uniform + list(allocations.values()))
    result["eval_seconds"] = time.perf_counter() - start

    # 3. data-aware orders: uniform ranks, and allocations under their own score on their factors
    saved = {p: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for p, l in model.adapter_layers().items()}
    result["orders"] = {}
    for score in ("output", "loss"):
        order_by_grams(model, layer_grams(model, score, stats))
        own = calibrate(model, batches, gradients=score == "loss")
        errors = layer_errors(model, score, own)
        mine = [Allocation.of(allocate(errors, costs, int(b * sum(costs.values()))), f"{score}-order-{score}-r{b}")
                for b in args.budgets if b in (1, 2, 4, 8)]
        result["orders"][score] = losses([1, 2, 4, 8] + mine)
        with torch.no_grad():
            for p, layer in model.adapter_layers().items():
                layer.lora_A.copy_(saved[p][0])
                layer.lora_B.copy_(saved[p][1])
    return result


def load_results() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]


def qlora_rank1(task: str, seed: int) -> float | None:
    path = TRAINED / f"{task}-qlora-r1-seed{seed}.json"
    return json.loads(path.read_text())["loss"]["1"] if path.exists() else None


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f} (n={len(xs)})"


def paired(diffs: list[float]) -> str:
    """" (-0.017 ± 0.006)": the mean paired difference and its sd over seeds; "" without pairs."""
    if not diffs:
        return ""
    mean = statistics.mean(diffs)
    sd = f" ± {statistics.stdev(diffs):.3f}" if len(diffs) > 1 else ""
    return f" ({'+' if mean >= 0 else ''}{mean:.3f}{sd})"


def report() -> str:
    results = load_results()
    lines = []
    for task in sorted({r["task"] for r in results}):
        runs = [r for r in results if r["task"] == task]
        budgets = sorted({float(k.split("-r")[-1]) for r in runs for k in r["allocations"]})
        def fmt_b(b):
            return f"{b:g}"
        lines += [f"### {task}: test answer loss at equal parameter counts ({len(runs)} seed(s), "
                  f"{runs[0]['test_rows']} test rows; lower is better)", "",
                  "| average rank | uniform | svd score | output score | loss score | output order (uniform) | "
                  "output order + own allocation | loss order (uniform) | loss order + own allocation |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for b in budgets:
            cells = []
            u = [r["loss"].get(str(int(b))) for r in runs] if b == int(b) else []
            cells.append(mean_sd([x for x in u if x is not None]))
            for score in SCORES:
                vals = [r["loss"][f"{score}-r{fmt_b(b)}"] for r in runs]
                diffs = [v - x for v, x in zip(vals, u) if x is not None]
                cells.append(mean_sd(vals) + paired(diffs))
            for score in ("output", "loss"):
                for key in (str(int(b)), f"{score}-order-{score}-r{fmt_b(b)}"):
                    pairs = [(r["orders"][score][key], x) for r, x in zip(runs, u)
                             if key in r["orders"][score] and x is not None]
                    diffs = [v - x for v, x in pairs]
                    cells.append(mean_sd([v for v, _ in pairs]) + paired(diffs))
            lines.append(f"| {fmt_b(b)} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("(In parentheses: minus uniform rank b of the SVD order, paired by seed: mean ± sd.)")
        lines.append("")
        q1 = [qlora_rank1(task, r["seed"]) for r in runs]
        if any(q is not None for q in q1):
            def at_rank1(r: dict, what: str) -> float:
                return r["orders"][what[0]][what[1]] if isinstance(what, tuple) else r["loss"][what]
            entries = {"uniform rank 1": "1", "svd score": "svd-r1", "loss score": "loss-r1",
                       "loss order": ("loss", "1"), "loss order + own allocation": ("loss", "loss-order-loss-r1")}
            gaps = ", ".join(f"{label}{paired([at_rank1(r, what) - q for r, q in zip(runs, q1) if q is not None])}"
                             for label, what in entries.items())
            lines.append(f"QLoRA rank-1 runs (same seeds): {mean_sd([q for q in q1 if q is not None])}. At the "
                         f"parameter count of rank 1, minus the QLoRA rank-1 run of the same seed: {gaps}.")
        cal = [r["calibration_seconds"] / r["train_seconds"] for r in runs]
        fwd = [r["calibration_forward_seconds"] / r["train_seconds"] for r in runs]
        lines.append(f"Calibration on {runs[0]['calibration_rows']} training rows: "
                     f"{100 * statistics.mean(cal):.1f} % of the run's training time with gradients (G and P), "
                     f"{100 * statistics.mean(fwd):.1f} % forward only (G).")
        lines.append("")
    return "\n".join(lines)


def plot(path: Path) -> None:
    """Test loss against average rank (parameters / rank-1 parameters), per task: uniform ranks
    and the allocations of each score (mean over seeds)."""
    from matplotlib.figure import Figure

    results = load_results()
    tasks = sorted({r["task"] for r in results})
    fig = Figure(figsize=(5 * len(tasks), 3.8))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        runs = [r for r in results if r["task"] == task]
        def curve(keys):
            xs, ys = [], []
            for key in keys:
                vals = [r["loss"][key] for r in runs if key in r["loss"]]
                if vals:
                    xs.append(float(key.split("-r")[-1]) if "-r" in key else float(key))
                    ys.append(statistics.mean(vals))
            return xs, ys
        ax.plot(*curve(["1", "2", "4", "8", "16", "32", "64"]), marker="o", label="uniform rank")
        budgets = sorted({k.split("-r")[-1] for r in runs for k in r["allocations"]}, key=float)
        for score in SCORES:
            ax.plot(*curve([f"{score}-r{b}" for b in budgets]), marker="s", linestyle="--",
                    label=f"per-layer ranks, {score} score")
        ax.set_xscale("log", base=2)
        low, high = ax.get_ylim()
        if high > 10 * max(low, 1e-9):  # the cipher spans four decades; the others a fraction of one
            ax.set_yscale("log")
        ax.set_xlabel("average rank (adapter parameters / those of rank 1)")
        ax.set_ylabel("test answer loss (lower is better)")
        ax.set_title(f"{task} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="asdiv")
    p.add_argument("--seeds", default="0")
    p.add_argument("--budgets", default="0.25,0.5,1,2,4,8", help="average ranks")
    p.add_argument("--calibration-rows", type=int, default=64)
    p.add_argument("--test-rows", type=int, default=100)
    p.add_argument("--rank-batch", type=int, default=8)
    p.add_argument("--runs", default=str(ROOT / "recipe-study" / "runs"), help="the recipe study's runs/")
    p.add_argument("--report", action="store_true", help="print the tables and put them in --doc")
    p.add_argument("--doc", default=str(ROOT.parent / "docs" / "rank-study.md"))
    args = p.parse_args()
    if args.report:
        from recipe_study import publish

        publish(report(), Path(args.doc), "allocation", plot, "allocation-study.png")
        return
    args.budgets = [float(b) if "." in b else int(b) for b in args.budgets.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = RESULTS / f"{args.task}-seed{seed}.json"
        if out.exists():
            continue
        print(f"[{time.strftime('%H:%M')}] {args.task} seed {seed}", flush=True)
        result = study_run(args.task, seed, args)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"[{time.strftime('%H:%M')}] wrote {out}", flush=True)


if __name__ == "__main__":
    main()
