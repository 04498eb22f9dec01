"""What the sweep's decision costs and how stable it is: exhaustive vs adaptive vs one rank, and
multiple choice from a shared prompt vs each option scored whole.

    .venv/bin/python benchmarks/sweep_decision.py RUN_DIR [--rows 300] [--questions 120] \
        [--repeats 1] [--resamples 200] --json benchmarks/results/sweep_decision.json
    .venv/bin/python benchmarks/sweep_decision.py RUN_DIR --replay --json ...   # agreement only, from the
        per-row statistics the full run saved beside the JSON (sweep_decision.stats.pt)

On one loaded run, interleaved (`--repeats` rounds, each running every way once, so machine noise
hits all alike):
- ASDiv test rows, loss + exact match (16 new tokens), ranks 1-64 and the base: `run_sweep`
  exhaustive, adaptive (the default), quick (`--quick`), and one rank (64; the base is always measured too, so
  "one rank" is rank 64 + base: two entries);
- MMLU test questions, choice (acc, acc_norm): `run_sweep` exhaustive, adaptive, quick and one rank
  (the sweep scores each prompt once, its options packed after it), and the two scoring paths
  alone at every rank: whole options (`choice_logliks`: prompt + option per option, what the
  sweep did before) and the shared prompt (`choice_logliks_shared`, what it does now), with the
  largest difference of their summed log-likelihoods.
Then, on the exhaustive per-row statistics, the agreement rates (`agreement`): `--resamples`
seeded bootstrap resamples of the rows, each decided exhaustively and by both adaptive modes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

from qdylora.core.rank import evaluating
from qdylora.data.batching import pad_token_id
from qdylora.data.rows import read_rows
from qdylora.evaluation.adaptive import measure, row_order
from qdylora.evaluation.choice import (choice_accuracy, choice_logliks, choice_logliks_shared, choice_questions,
                                       encode_questions)
from qdylora.evaluation.confidence import GOOD
from qdylora.evaluation.settings import SweepSettings
from qdylora.evaluation.sweep import DecisionRule, eval_format, run_sweep
from qdylora.training.losses import autocast_context
from qdylora.training.rundir import load_run

RANKS = [1, 2, 4, 8, 16, 32, 64]


def timed(work):
    start = time.perf_counter()
    out = work()
    return time.perf_counter() - start, out


# The values each sweep family measures together (one adaptive loop each, as `run_sweep` runs them).
FAMILIES = (("loss", "perplexity"), ("exact_match", "rouge1", "rouge2", "rougeL", "bleu"), ("acc", "acc_norm"))


def agreement(stats: dict, rule: DecisionRule, resamples: int) -> dict:
    """On `resamples` seeded bootstrap resamples of the rows, each decided exhaustively and by
    both adaptive modes (the same `measure` and `DecisionRule` as the sweep, replayed on the stored
    per-row statistics, one loop per metric family): per recommended value, how often each mode
    picks the exhaustive sweep's rank ("same"), how often the exhaustive decision calls its pick
    good enough ("good"), the share of (entry, row) cells it measured, and how often the
    exhaustive pick on a resample equals its pick on all the rows (how stable the decision is)."""
    on_all = rule.decisions(stats, rule.boot)
    out: dict = {"resamples": resamples}
    for mode in ("adaptive", "quick"):
        same: dict[str, int] = {}
        good: dict[str, int] = {}
        cells: dict[str, list] = {}
        changed: dict[str, list] = {}
        stable: dict[str, int] = {}
        for family in FAMILIES:
            part = {v: by for v, by in stats.items() if v in family}
            if not part:
                continue
            n = next(iter(next(iter(part.values())).values())).shape[0]
            entries = list(next(iter(part.values())))
            for seed in range(resamples):
                pick = torch.randint(n, (n,), generator=torch.Generator().manual_seed(10_000 + seed))
                sample = {v: {e: s[pick] for e, s in by.items()} for v, by in part.items()}
                full = rule.decisions(sample, rule.boot)
                count = [0]

                def score(live, rows, sample=sample, count=count):
                    count[0] += len(live) * len(rows)
                    return {v: {e: by[e][rows] for e in live} for v, by in sample.items()}

                judge = rule.judge(entries, n if mode == "quick" else None)
                found = rule.decisions(measure(score, entries, row_order(n, seed), judge), rule.boot)
                for v, d in found.items():
                    exh = full[v]
                    same[v] = same.get(v, 0) + (d.recommended == exh.recommended)
                    good[v] = good.get(v, 0) + (d.recommended == exh.recommended
                                                or exh.comparisons[d.recommended].verdict == GOOD)
                    stable[v] = stable.get(v, 0) + (exh.recommended == on_all[v].recommended)
                    if d.recommended != exh.recommended:
                        changed.setdefault(v, []).append([str(exh.recommended), str(d.recommended)])
                cells.setdefault(family[0], []).append(count[0] / (len(entries) * n))
        out[mode] = {"same": {v: k / resamples for v, k in same.items()},
                     "good": {v: k / resamples for v, k in good.items()},
                     "cells_measured_mean": {f: round(statistics.mean(c), 3) for f, c in cells.items()},
                     "disagreements (exhaustive -> mode)": {v: c[:10] for v, c in changed.items()}}
        out["exhaustive_pick_stable"] = {v: k / resamples for v, k in stable.items()}
    return out


def summary(result) -> dict:
    return {"values": {v: {str(r): round(x, 4) for r, x in by.items()} for v, by in result.values.items()},
            "intervals": {v: {str(r): [round(a, 4), round(b, 4)] for r, (a, b) in by.items()}
                          for v, by in result.intervals.items()},
            "rows": {v: {str(r): n for r, n in by.items()} for v, by in result.rows.items()},
            "recommended": {v: str(r) for v, r in result.recommended.items()},
            "messages": result.messages(), "seconds": {k: round(x, 1) for k, x in result.seconds.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--questions", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: asdiv, mmlu")
    ap.add_argument("--json", required=True)
    ap.add_argument("--replay", action="store_true",
                    help="only recompute the agreement from the per-row statistics an earlier run saved beside --json")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    stats_path = os.path.splitext(args.json)[0] + ".stats.pt"
    if args.replay:
        saved = torch.load(stats_path)
        for part, stats in saved.items():
            print(part, json.dumps(agreement(stats, DecisionRule.make(), args.resamples), indent=1))
        return

    model, tok, settings = load_run(args.run)
    report: dict = {"machine": machine.facts(), "run": args.run, "ranks": RANKS, "batch_size": args.batch_size,
                    "compute_dtype": model.qdylora_config.compute_dtype, "repeats": args.repeats}
    opts = dict(batch_size=args.batch_size)
    ways: dict = {}
    if "asdiv" not in skip:
        rows = read_rows("asdiv:test")[:args.rows]
        fmt = eval_format(settings.data, "asdiv:test")
        def asdiv(ranks, exhaustive=False, quick=False):
            every = SweepSettings(metrics="loss,exact_match", max_new_tokens=16, exhaustive=exhaustive, quick=quick,
                                  **opts)
            return run_sweep(model, tok, rows, fmt, ranks, every, progress=False)

        ways |= {"asdiv exhaustive": lambda: asdiv(RANKS, exhaustive=True), "asdiv adaptive": lambda: asdiv(RANKS),
                 "asdiv quick": lambda: asdiv(RANKS, quick=True), "asdiv one rank": lambda: asdiv([64], True)}
        report["asdiv_rows"] = len(rows)
    if "mmlu" not in skip:
        qrows = read_rows("mmlu:test")[:args.questions]
        qfmt = eval_format(settings.data, "mmlu:test")
        questions = choice_questions(qrows)
        chat = qfmt.chat_template and qfmt.format != "text"
        encoded = encode_questions(questions, tok, chat=chat,
                                   max_length=qfmt.max_source_length + qfmt.max_target_length)
        examples = [e for q in encoded for e in q.examples()]
        dtype = model.qdylora_config.torch_compute_dtype
        device = next(model.parameters()).device
        scoring = dict(pad_id=pad_token_id(tok), batch_size=args.batch_size,
                       autocast=lambda: autocast_context(device, dtype, dtype != torch.float32))

        def paths(shared: bool):  # one way of scoring every option at every rank, alone
            with evaluating(model):
                ll = (choice_logliks_shared(model, encoded, [0, *RANKS], **scoring) if shared
                      else choice_logliks(model, examples, [0, *RANKS], **scoring))
            return {r: choice_accuracy(x, questions) for r, x in ll.items()}, ll

        def mmlu(ranks, exhaustive=False, quick=False):
            return run_sweep(model, tok, qrows, qfmt, ranks, SweepSettings(
                metrics="choice", exhaustive=exhaustive, quick=quick, **opts), progress=False)

        ways |= {"mmlu whole options": lambda: paths(False), "mmlu shared prompt": lambda: paths(True),
                 "mmlu exhaustive": lambda: mmlu(RANKS, exhaustive=True), "mmlu adaptive": lambda: mmlu(RANKS),
                 "mmlu quick": lambda: mmlu(RANKS, quick=True), "mmlu one rank": lambda: mmlu([64], True)}
        report["mmlu_questions"] = len(questions)
    times: dict = {w: [] for w in ways}
    results: dict = {}
    for _ in range(args.repeats):
        for name, work in ways.items():
            seconds, results[name] = timed(work)
            times[name].append(seconds)
            print(f"{name}: {seconds:.1f} s", flush=True)
    median = {w: statistics.median(t) for w, t in times.items()}
    report["seconds"] = {w: {"median": round(m, 1), "all": [round(t, 1) for t in times[w]]} for w, m in median.items()}
    for part in ("asdiv", "mmlu"):
        if f"{part} exhaustive" not in results:
            continue
        full = results[f"{part} exhaustive"]
        one = median[f"{part} one rank"]
        report[part] = {
            "exhaustive": summary(full), "one_rank": summary(results[f"{part} one rank"]),
            "exhaustive_over_one_rank": round(median[f"{part} exhaustive"] / one, 2),
            "agreement_on_resamples": agreement(full.row_stats, DecisionRule.make(), args.resamples),
        }
        for mode in ("adaptive", "quick"):
            got = results[f"{part} {mode}"]
            report[part][mode] = summary(got)
            report[part][f"{mode}_over_one_rank"] = round(median[f"{part} {mode}"] / one, 2)
            report[part][f"{mode}_same_recommendation_on_these_rows"] = {
                v: str(full.recommended[v]) == str(got.recommended[v]) for v in full.decisions}
    torch.save({part: results[f"{part} exhaustive"].row_stats for part in ("asdiv", "mmlu")
                if f"{part} exhaustive" in results}, stats_path)  # for --replay
    if "mmlu whole options" in results:
        (whole, whole_ll), (shared, shared_ll) = results["mmlu whole options"], results["mmlu shared prompt"]
        gaps = torch.cat([(whole_ll[r] - shared_ll[r]).abs() for r in whole_ll])  # (entries * options,)
        report["mmlu"]["loglik_difference"] = {"max": round(float(gaps.max()), 4), "mean": round(float(gaps.mean()), 4),
                                               "compute_dtype": report["compute_dtype"]}
        report["mmlu"]["whole_options_over_shared_prompt"] = round(median["mmlu whole options"]
                                                                   / median["mmlu shared prompt"], 2)
        report["mmlu"]["whole_options_scores"] = {str(r): s for r, s in whole.items()}
        report["mmlu"]["shared_prompt_scores"] = {str(r): s for r, s in shared.items()}
        report["mmlu"]["scores_equal"] = whole == shared  # accuracies; bf16 rounding can flip close questions
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k not in ("asdiv", "mmlu")}, indent=1))
    for part in ("asdiv", "mmlu"):
        if part in report:
            print(part, json.dumps({k: v for k, v in report[part].items()
                                    if k not in ("exhaustive", "adaptive", "quick", "one_rank", "whole_options_scores",
                                                 "shared_prompt_scores")}, indent=1))


if __name__ == "__main__":
    main()
