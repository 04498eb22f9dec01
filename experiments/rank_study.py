"""The rank study: one QDyLoRA run against QLoRA runs trained separately at each rank.

    .venv/bin/python experiments/rank_study.py                 # run (or continue) the study
    .venv/bin/python experiments/rank_study.py --report        # tables (also into docs/rank-study.md),
                                                               # plot and results.json

SmolLM2-135M-Instruct on the embedded ASDiv split (1,905 train / 100 validation / 300 test),
every run with the same steps, batch, learning rate, schedule, alpha rule (alpha / b), seed and
data order; only the rank rule differs:

    qdylora      ranks drawn uniformly from 1..64, update mode full
    qlora-r{r}   min_rank == max_rank == r for r in 1, 2, ..., 64 (the same code path)
    frozen       as qdylora with DyLoRA's update rule (only component b trains)
    pow2         as qdylora with ranks drawn from 1, 2, 4, ..., 64 only

Each run is evaluated on the test split at every power-of-two rank it supports (QLoRA runs at
their own rank and, for seeds 0 and 1, truncated to lower ranks) plus the base model: answer loss on --test-rows
rows and exact match on --em-rows rows (QLoRA runs: exact match at their own rank only, the
ablations at ranks 1, 8 and 64: generation is 2/3 of the evaluation time, and the loss carries
the comparison).

Resumable: training resumes from a run's checkpoints, and each finished evaluation is written to
OUT/results/<run>-seed<s>.json, so running the command again continues where it stopped. Runs go
in a fixed order (all runs for seed 0 first, then more seeds of QDyLoRA and of QLoRA at ranks 1, 8
and 64, the ranks the QDyLoRA paper reports), so partial results are the most useful ones. The extra
seeds measure the loss only: a run takes ~20 min on a 2-core CPU, and exact match on this model
is 0-1 % at every rank (one test row is one point), so its seed spread would say nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

QLORA_RANKS = [1, 2, 4, 8, 16, 32, 64]
RUNS = {"qdylora": dict(), **{f"qlora-r{r}": dict(min_rank=r, max_rank=r) for r in QLORA_RANKS},
        "frozen": dict(update_mode="frozen"), "pow2": dict(ranks="1,2,4,8,16,32,64")}
ORDER = ["qdylora", "qlora-r8", "qlora-r1", "qlora-r64", "qlora-r2", "qlora-r4", "qlora-r16", "qlora-r32",
         "frozen", "pow2"]
SEEDED = ["qdylora", "qlora-r1", "qlora-r8", "qlora-r64"]  # the runs repeated over seeds (loss only)


def settings_for(name: str, seed: int, args):
    from qdylora import QDyLoRAConfig
    from qdylora.training.settings import DataSettings, RunSettings, TrainSettings

    spec = RUNS[name]
    max_rank = spec.get("max_rank", 64)
    adapter = QDyLoRAConfig(max_rank=max_rank, alpha=16, dropout=0.05, seed=seed, scaling="standard",
                            update_mode=spec.get("update_mode", "full"))
    train = TrainSettings(max_steps=args.steps, micro_batch_size=8, grad_accumulation=1, lr=args.lr,
                          schedule="cosine", warmup_steps=max(1, args.steps // 20), eval_every=0,
                          save_every=max(1, args.steps // 4), min_rank=spec.get("min_rank", 1),
                          rank_rule="step", order="none",
                          ranks=spec.get("ranks"), eval_ranks=str(max_rank))
    return RunSettings(adapter=adapter, data=DataSettings(), train=train)


def eval_ranks(name: str, seed: int = 0) -> list[int]:
    """Every power-of-two rank a run supports; a QLoRA run of seed 2 only at its own rank (the
    truncated ranks are measured on seeds 0 and 1: that evaluation did not fit the session)."""
    top = RUNS[name].get("max_rank", 64)
    if "min_rank" in RUNS[name] and seed >= 2:
        return [top]
    return [r for r in QLORA_RANKS if r <= top]


def em_ranks(name: str) -> list[int]:
    """Exact match is generation, 2/3 of the evaluation time: QLoRA runs get it at their own rank
    only (their truncated ranks are shown with the loss), the ablations at ranks 1, 8 and 64 (the
    paper's), QDyLoRA at every rank."""
    spec = RUNS[name]
    if "min_rank" in spec:
        return [spec["max_rank"]]
    return eval_ranks(name) if name == "qdylora" else [1, 8, 64]


def run_one(name: str, seed: int, args) -> dict:
    from qdylora.data.embedded import asdiv_split
    from qdylora.evaluation.settings import SweepSettings
    from qdylora.evaluation.sweep import run_sweep
    from qdylora.training.rundir import latest_checkpoint, read_json
    from qdylora.training.rundir import load_run
    from qdylora.training.trainer import train

    out = Path(args.out) / "runs" / f"{name}-seed{seed}"
    settings = settings_for(name, seed, args)
    summary_file = out / "summary.json"
    done = summary_file.exists() and read_json(summary_file).get("status") == "done"
    if not done:
        resume = (out / "config.json").exists() and latest_checkpoint(out) is not None
        print(f"[{time.strftime('%H:%M')}] train {name} seed {seed} ({'resume' if resume else 'start'})", flush=True)
        train(settings, out, resume=resume, overwrite=not resume, progress=args.progress)
    summary = read_json(summary_file)
    print(f"[{time.strftime('%H:%M')}] evaluate {name} seed {seed}", flush=True)
    model, tokenizer, saved = load_run(out)
    rows = asdiv_split("test")
    data = saved.data.with_embedded_default()
    result = {"run": name, "seed": seed, "steps": summary["steps"], "train_seconds": summary["seconds"],
              "train_tokens": summary["tokens"], "val_loss_after": summary["val_loss_after"]}
    start = time.perf_counter()
    loss = run_sweep(model, tokenizer, rows[: args.test_rows], data, eval_ranks(name, seed),
                     SweepSettings(metrics="loss"), progress=args.progress)
    em_rows = args.em_rows if seed == args.seeds[0] else 0
    em = run_sweep(model, tokenizer, rows[:em_rows], data, em_ranks(name),
                   SweepSettings(metrics="exact_match", max_new_tokens=16), progress=args.progress) if em_rows else None
    result.update(loss={str(r): v for r, v in loss.values["loss"].items()},
                  exact_match={str(r): v for r, v in em.values["exact_match"].items()} if em else {},
                  test_rows=args.test_rows, em_rows=em_rows, eval_seconds=time.perf_counter() - start)
    return result


def plan(args) -> list[tuple[str, int]]:
    first = [(name, args.seeds[0]) for name in ORDER]
    more = [(name, seed) for seed in args.seeds[1:] for name in SEEDED]
    return [(n, s) for n, s in first + more if not args.runs or n in args.runs]


def run_study(args) -> None:
    from qdylora.training.rundir import write_json

    results = Path(args.out) / "results"
    results.mkdir(parents=True, exist_ok=True)
    for name, seed in plan(args):
        path = results / f"{name}-seed{seed}.json"
        if path.exists():
            continue
        write_json(path, run_one(name, seed, args))  # atomic: a killed run leaves no partial result
        print(f"[{time.strftime('%H:%M')}] wrote {path}", flush=True)


DOC_TABLES = {"loss": "loss on the test rows", "exact_match": "exact_match on the test rows",
              "cut": "QLoRA runs evaluated at their own rank", "paired": "Training loss, QDyLoRA minus QLoRA",
              "deltas": "Adapter deltas cut to rank b"}


def update_doc(doc: Path, text: str) -> None:
    """Put each table of the report `text` between its <!-- table:NAME --> markers in `doc`
    (the prose around them is written by hand and must be checked against the new numbers)."""
    page = doc.read_text()
    for name, heading in DOC_TABLES.items():
        if heading not in text:
            continue
        after = text[text.index(heading):].splitlines()[1:]
        start = next(i for i, line in enumerate(after) if line.startswith("|"))
        end = next((i for i in range(start, len(after)) if not after[i].startswith("|")), len(after))
        table = "\n".join(after[start:end])
        page = re.sub(rf"(<!-- table:{name} -->\n).*?(\n<!-- /table:{name} -->)",
                      lambda m: m.group(1) + table + m.group(2), page, flags=re.S)
    doc.write_text(page)


def paired_gaps(by: dict[tuple[str, str], dict[str, dict[int, float]]], metric: str, rank: int) -> list[float]:
    """QDyLoRA minus the QLoRA run of this rank, at this rank, one value per seed that has both."""
    q = by.get((f"qlora-r{rank}", metric), {}).get(str(rank), {})
    d = by.get(("qdylora", metric), {}).get(str(rank), {})
    return [d[s] - q[s] for s in sorted(q.keys() & d.keys())]


def report(args) -> None:
    """results.json, the markdown tables on stdout (and in --doc), the plot."""
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        _report(args)
    print(text.getvalue(), end="")
    if args.doc and Path(args.doc).exists():
        update_doc(Path(args.doc), text.getvalue())
        print(f"tables updated in {args.doc}")


def _report(args) -> None:
    results = [json.loads(p.read_text()) for p in sorted((Path(args.out) / "results").glob("*.json"))]
    if not results:
        sys.exit("no results yet: run the study first")
    by: dict[tuple[str, str], dict[str, dict[int, float]]] = {}  # (run, metric) -> rank -> seed -> value
    for r in results:
        for metric in ("loss", "exact_match"):
            for rank, v in r[metric].items():
                by.setdefault((r["run"], metric), {}).setdefault(rank, {})[r["seed"]] = v

    def fmt(vs: list[float], digits: int, sign: str = "") -> str:
        if not vs:
            return "-"
        if len(vs) == 1:
            return f"{vs[0]:{sign}.{digits}f}"
        return f"{statistics.mean(vs):{sign}.{digits}f} ± {statistics.stdev(vs):.{digits}f} (n={len(vs)})"

    def seeds(run: str, metric: str, rank: str) -> dict[int, float]:
        return by.get((run, metric), {}).get(rank, {})

    def cell(run: str, metric: str, rank: str, digits: int = 3) -> str:
        vs = list(seeds(run, metric, rank).values())
        if rank == "0" and vs:  # the base model: the same with every seed
            return f"{vs[0]:.{digits}f}"
        return fmt(vs, digits)

    def own(rank: str) -> str:
        return "qlora-r1" if rank == "0" else f"qlora-r{rank}"

    def difference(metric: str, rank: str, digits: int) -> str:
        return fmt(paired_gaps(by, metric, int(rank)), digits, "+") if rank != "0" else ""

    ranks = ["0"] + [str(r) for r in QLORA_RANKS]
    for metric, digits in (("loss", 3), ("exact_match", 1)):
        print(f"\n{metric} on the test rows (one value: seed 0; mean ± sd (n=seeds) otherwise; the difference "
              "pairs runs of the same seed)\n")
        print("| rank | QLoRA, a run at this rank | QDyLoRA, one run | QDyLoRA − QLoRA | frozen ablation "
              "| powers-of-two ablation |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for rank in ranks:
            print(f"| {'base' if rank == '0' else rank} | {cell(own(rank), metric, rank, digits)} | "
                  f"{cell('qdylora', metric, rank, digits)} | {difference(metric, rank, digits)} | "
                  f"{cell('frozen', metric, rank, digits)} | {cell('pow2', metric, rank, digits)} |")
    print("\nBest rank (lowest mean loss; ties in exact match go to the smaller rank):\n")
    for run in ("qlora", "qdylora", "frozen", "pow2"):
        for metric, digits, sign in (("loss", 3, 1), ("exact_match", 1, -1)):
            scores = {int(k): statistics.mean(seeds(own(k) if run == "qlora" else run, metric, k).values())
                      for k in ranks[1:] if seeds(own(k) if run == "qlora" else run, metric, k)}
            if scores:
                best = min(scores, key=lambda k: (sign * scores[k], k))
                print(f"- {run}, {metric}: rank {best}, {scores[best]:.{digits}f}")
    print("\nQLoRA runs evaluated at their own rank and truncated to lower ranks (loss):\n")
    print("| run | " + " | ".join(f"r{r}" for r in QLORA_RANKS) + " |")
    print("| --- |" + " ---: |" * len(QLORA_RANKS))
    for r in QLORA_RANKS:
        name = f"qlora-r{r}"
        print(f"| {name} | " + " | ".join(cell(name, "loss", str(k)) for k in QLORA_RANKS) + " |")
    seconds: dict[tuple[str, int], float] = {(r["run"], r["seed"]): r["train_seconds"] for r in results}
    evals: dict[tuple[str, int], float] = {(r["run"], r["seed"]): r["eval_seconds"] for r in results}
    first = min(r["seed"] for r in results)
    qlora = [(f"qlora-r{r}", first) for r in QLORA_RANKS]
    if ("qdylora", first) in seconds and all(k in seconds for k in qlora):
        q, total = seconds[("qdylora", first)], sum(seconds[k] for k in qlora)
        print(f"\ntraining time, seed {first}: 1 QDyLoRA run {q / 60:.1f} min, 7 QLoRA runs {total / 60:.1f} min "
              f"(ratio {total / q:.2f}); per QLoRA run: "
              + ", ".join(f"r{r} {seconds[(f'qlora-r{r}', first)] / 60:.1f}" for r in QLORA_RANKS))
    all_seeds = sorted({r["seed"] for r in results})
    for seed in all_seeds:
        mine = {f"qlora-r{r}": seconds[(f"qlora-r{r}", seed)] for r in QLORA_RANKS if (f"qlora-r{r}", seed) in seconds}
        if ("qdylora", seed) in seconds and mine:
            q = seconds[("qdylora", seed)]
            print(f"seed {seed}: QDyLoRA {q / 60:.1f} min; "
                  + ", ".join(f"{run} {t / 60:.1f}" for run, t in mine.items())
                  + f" min; mean QLoRA run / QDyLoRA run {statistics.mean(mine.values()) / q:.2f}")
    print(f"total compute of the results so far: training {sum(seconds.values()) / 3600:.2f} h, "
          f"evaluation {sum(evals.values()) / 3600:.2f} h ({len(results)} runs)")
    _paired_training_loss(Path(args.out) / "runs", all_seeds)
    _cut_sizes(Path(args.out) / "runs", first)
    out = Path(args.out) / "results.json"
    out.write_text(json.dumps(results, indent=1))
    _plot(by, Path(args.plot))
    print(f"\nraw results: {out}; plot: {args.plot}")


def _paired_training_loss(runs: Path, seeds: list[int]) -> None:
    """Training loss of QDyLoRA minus QLoRA on the same batches (same seed: same data order) over
    the second half of training, by the rank QDyLoRA drew at that step, pooled over the seeds that
    have both runs. Needs the run directories."""
    def losses(name: str, seed: int) -> dict[int, dict]:
        path = runs / f"{name}-seed{seed}" / "metrics.jsonl"
        if not path.exists():
            return {}
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {r["step"]: r for r in rows if "rank" in r and "loss" in r}

    bins = ((1, 8), (9, 32), (33, 64))
    lines, used = [], set()
    dynamics = {seed: losses("qdylora", seed) for seed in seeds}
    for r in (1, 8, 64):
        diffs: dict[tuple[int, int], list[float]] = {b: [] for b in bins}
        for seed in seeds:
            dynamic, fixed = dynamics[seed], losses(f"qlora-r{r}", seed)
            if not dynamic or not fixed or len(fixed) < len(dynamic):
                continue  # a run still training
            used.add(seed)
            for s in sorted(dynamic)[len(dynamic) // 2:]:
                lo, hi = next(b for b in bins if b[0] <= dynamic[s]["rank"] <= b[1])
                diffs[(lo, hi)].append(dynamic[s]["loss"] - fixed[s]["loss"])
        if any(diffs.values()):
            lines.append(f"| QLoRA r{r} | " + " | ".join(
                f"{statistics.mean(d):+.3f} ({len(d)} steps)" if d else "-" for d in diffs.values()) + " |")
    early = {name: statistics.mean(r["loss"] for s, r in rows.items() if s <= 10)
             for name in ["qdylora"] + [f"qlora-r{r}" for r in QLORA_RANKS] if (rows := losses(name, seeds[0]))}
    if early:
        print(f"\nmean training loss of steps 1-10 (seed {seeds[0]}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in early.items()))
    if lines:
        pooled = f"seed {min(used)}" if len(used) == 1 else f"seeds {', '.join(map(str, sorted(used)))} pooled"
        print("\nTraining loss, QDyLoRA minus QLoRA on the same batches, second half of training, "
              f"by the rank QDyLoRA drew ({pooled}):\n")
        print("| against | drawn 1-8 | drawn 9-32 | drawn 33-64 |")
        print("| --- | ---: | ---: | ---: |")
        print("\n".join(lines))


def _cut_sizes(runs: Path, seed: int) -> None:
    """Why a cut fixed-rank adapter can still work: the size of B's columns, and how the rank-b
    cut delta (alpha/b) B[:, :b] A[:b] compares with the full one, for two layers."""
    import torch
    from safetensors.torch import load_file

    layers = ("model.layers.0.self_attn.q_proj", "model.layers.15.mlp.down_proj")
    print(f"\nAdapter deltas cut to rank b against the full delta (seed {seed}; alpha 16):\n")
    print("| run | layer | B column norms (min-max) | rank-1 cut: norm / full norm, cosine | rank-8 cut: same |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in ("qlora-r8", "qlora-r64", "qdylora"):
        path = runs / f"{name}-seed{seed}" / "adapter.safetensors"
        if not path.exists():
            continue
        tensors = load_file(str(path))
        for layer in layers:
            a, b = tensors[f"{layer}.lora_A"].double(), tensors[f"{layer}.lora_B"].double()  # (r, in), (out, r)
            full = 16 / a.shape[0] * b @ a
            cells = []
            for k in (1, 8):
                cut = 16 / k * b[:, :k] @ a[:k]
                cos = torch.nn.functional.cosine_similarity(cut.flatten(), full.flatten(), dim=0)
                cells.append(f"{cut.norm() / full.norm():.2f}, {cos:.2f}")
            cols = b.norm(dim=0)
            print(f"| {name} | {layer.removeprefix('model.')} | {cols.min():.3f}-{cols.max():.3f} | "
                  + " | ".join(cells) + " |")


def _plot(by: dict[tuple[str, str], dict[str, dict[int, float]]], path: Path) -> None:
    """Loss and exact match against rank (log scale), and the loss of QDyLoRA minus QLoRA paired
    by seed; error bars are the sd over seeds where a point has several; the grey line is the
    QLoRA rank-64 run cut to lower ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def points(run: str, metric: str, only: str | None = None):
        got = by.get((run, metric), {})
        return sorted((int(k), statistics.mean(v.values()), statistics.stdev(v.values()) if len(v) > 1 else 0.0)
                      for k, v in got.items() if k != "0" and (only is None or k == only))

    def draw(ax, pts, style, label, **kw):
        if pts:
            ax.errorbar([math.log2(k) for k, _, _ in pts], [m for _, m, _ in pts], yerr=[e for _, _, e in pts],
                        fmt=style, label=label, capsize=3, **kw)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for ax, metric in zip(axes, ("loss", "exact_match")):
        own = [p for r in QLORA_RANKS for p in points(f"qlora-r{r}", metric, str(r))]
        draw(ax, own, "kD-", "QLoRA (a run per rank)")
        for run, label, style in (("qdylora", "QDyLoRA (one run)", "o-"), ("frozen", "frozen ablation", "s--"),
                                  ("pow2", "powers-of-two ablation", "^--")):
            draw(ax, points(run, metric), style, label)
        if metric == "loss":
            draw(ax, points("qlora-r64", metric), ":", "QLoRA r64 cut to lower ranks", color="grey")
        base = by.get(("qdylora", metric), {}).get("0")
        note = f" (base model: {next(iter(base.values())):.{3 if metric == 'loss' else 0}f})" if base else ""
        ax.set_title(("test answer loss" if metric == "loss" else "test exact match, %") + note, fontsize=10)
    gaps = [(r, statistics.mean(g), statistics.stdev(g) if len(g) > 1 else 0.0)
            for r in QLORA_RANKS if (g := paired_gaps(by, "loss", r))]
    draw(axes[2], gaps, "o-", "QDyLoRA − QLoRA, same seed")
    axes[2].axhline(0, color="grey", lw=0.8)
    axes[2].set_title("test answer loss, QDyLoRA minus QLoRA (paired by seed)", fontsize=10)
    for ax in axes:
        ax.set_xticks(range(7), [str(r) for r in QLORA_RANKS])
        ax.set_xlabel("rank")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--test-rows", type=int, default=100, help="test rows for the loss (of 300)")
    ap.add_argument("--em-rows", type=int, default=100, help="test rows for exact match (of 300)")
    ap.add_argument("--out", default="experiments/rank-study")
    ap.add_argument("--plot", default="docs/img/rank-study.png")
    ap.add_argument("--runs", type=lambda s: s.split(","), default=None, help="only these runs (default: all)")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--doc", default="docs/rank-study.md", help="--report rewrites the tables in this page")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    report(args) if args.report else run_study(args)


if __name__ == "__main__":
    main()
