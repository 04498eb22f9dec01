"""Rank sweep cost: 7 ranks rank-batched, 7 ranks one after another, and a single rank.

    .venv/bin/python benchmarks/sweep_speed.py RUN_DIR --data EVAL.jsonl [--examples 48] [--repeats 2]

Loads the run once, then alternates the three ways (rank-batched, sequential, one rank = the
max rank; `--repeats` times) for each metric, so machine noise hits all alike, and prints the
median seconds, the ratio sequential / batched and the ratio batched / one rank (the cost of
sweeping 7 ranks in units of evaluating one). All use the same batches and settings; batched
and sequential results are checked to agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

from qdylora.data.batching import fixed_batches, pad_token_id
from qdylora.data.rows import generation_prompts, read_rows, row_format, tokenize
from qdylora.evaluation.generation import generate_at_ranks
from qdylora.evaluation.sweep import default_ranks
from qdylora.training.losses import losses_at_ranks
from qdylora.training.rundir import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--data", required=True)
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    model, tok, s = load_run(args.run)
    model.eval()
    ranks = [r for r in default_ranks(model.qdylora_config.max_rank) if r > 0]  # 7 ranks for R = 64
    rows = read_rows(args.data)[: args.examples]
    d = s.data
    rf = row_format(d, rows[0].keys(), args.data)
    examples, _ = tokenize(rows, tok, rf, max_source_length=d.max_source_length,
                           max_target_length=d.max_target_length)
    batches = fixed_batches(examples, args.batch_size)
    prompts, _ = generation_prompts(rows, tok, rf, max_source_length=d.max_source_length)
    pad = pad_token_id(tok)
    device = next(model.parameters()).device

    jobs = {
        "loss": lambda rs, rb: losses_at_ranks(model, batches, rs, pad, device, rank_batch=rb),
        "exact_match": lambda rs, rb: generate_at_ranks(model, tok, prompts, rs, batch_size=args.batch_size,
                                                        max_new_tokens=args.max_new_tokens, rank_batch=rb),
    }
    report = {"machine": machine.facts(), "ranks": ranks, "examples": len(rows), "batch_size": args.batch_size,
              "compute_dtype": model.qdylora_config.compute_dtype}
    ways = (("batched", ranks, 0), ("sequential", ranks, 1), ("one_rank", ranks[-1:], 1))
    for name, job in jobs.items():
        times = {way: [] for way, _, _ in ways}
        results = {}
        for _ in range(args.repeats):
            for way, rs, rb in ways:
                start = time.perf_counter()
                results[way] = job(rs, rb)
                times[way].append(time.perf_counter() - start)
        if name == "loss":
            agree = all(abs(results["batched"][r][0] - results["sequential"][r][0])
                        <= 1e-3 * abs(results["sequential"][r][0]) for r in ranks)
        else:
            same = sum(a == b for r in ranks for a, b in zip(results["batched"][r], results["sequential"][r]))
            agree = f"{same}/{len(ranks) * len(prompts)} generations identical"
        b, q, one = (statistics.median(times[w]) for w in ("batched", "sequential", "one_rank"))
        report[name] = {"batched_s": round(b, 2), "sequential_s": round(q, 2), "one_rank_s": round(one, 2),
                        "sequential_over_batched": round(q / b, 2), "batched_over_one_rank": round(b / one, 2),
                        "results_agree": agree, "all_s": {w: [round(t, 2) for t in ts] for w, ts in times.items()}}
        print(f"{name}: {len(ranks)} ranks rank-batched {b:.1f} s, one after another {q:.1f} s "
              f"(ratio {q / b:.2f}); one rank {one:.1f} s: {len(ranks)} ranks cost {b / one:.2f}x one rank",
              flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
