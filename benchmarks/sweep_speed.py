"""Rank-batched sweep vs one rank after another, on a trained run.

    .venv/bin/python benchmarks/sweep_speed.py RUN_DIR --data EVAL.jsonl [--examples 48] [--repeats 2]

Loads the run once, then alternates the two ways (batched first, then sequential, `--repeats`
times) for each metric, so machine noise hits both alike, and prints the median seconds and the
ratio sequential / batched. Both use the same batches, ranks and settings; the results are
checked to agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qdylora.batching import fixed_batches, pad_token_id
from qdylora.data import generation_prompts, read_rows, tokenize
from qdylora.generation import generate_at_ranks
from qdylora.losses import losses_at_ranks
from qdylora.sweep import default_ranks, load_run


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
    ranks = [r for r in default_ranks(model.config.max_rank) if r > 0]  # 7 ranks for R = 64
    rows = read_rows(args.data)[: args.examples]
    d = s.data
    rf = d.row_format(rows[0].keys(), args.data)
    examples, _ = tokenize(rows, tok, rf, max_source_length=d.max_source_length,
                           max_target_length=d.max_target_length)
    batches = fixed_batches(examples, args.batch_size)
    prompts, _ = generation_prompts(rows, tok, rf, max_source_length=d.max_source_length)
    pad = pad_token_id(tok)
    device = next(model.parameters()).device

    jobs = {
        "loss": lambda rb: losses_at_ranks(model, batches, ranks, pad, device, rank_batch=rb),
        "exact_match": lambda rb: generate_at_ranks(model, tok, prompts, ranks, batch_size=args.batch_size,
                                                    max_new_tokens=args.max_new_tokens, rank_batch=rb),
    }
    report = {"ranks": ranks, "examples": len(rows), "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "compute_dtype": model.config.compute_dtype}
    for name, job in jobs.items():
        times = {"batched": [], "sequential": []}
        results = {}
        for _ in range(args.repeats):
            for way, rb in (("batched", 0), ("sequential", 1)):
                start = time.perf_counter()
                results[way] = job(rb)
                times[way].append(time.perf_counter() - start)
        if name == "loss":
            agree = all(abs(results["batched"][r][0] - results["sequential"][r][0])
                        <= 1e-3 * abs(results["sequential"][r][0]) for r in ranks)
        else:
            same = sum(a == b for r in ranks for a, b in zip(results["batched"][r], results["sequential"][r]))
            agree = f"{same}/{len(ranks) * len(prompts)} generations identical"
        b, q = statistics.median(times["batched"]), statistics.median(times["sequential"])
        report[name] = {"batched_s": round(b, 2), "sequential_s": round(q, 2),
                        "sequential_over_batched": round(q / b, 2), "results_agree": agree,
                        "all_batched_s": [round(t, 2) for t in times["batched"]],
                        "all_sequential_s": [round(t, 2) for t in times["sequential"]]}
        print(f"{name}: rank-batched {b:.1f} s, one rank at a time {q:.1f} s, ratio {q / b:.2f}", flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
