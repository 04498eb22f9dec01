"""Step time of each rank rule against a plain QLoRA rank-64 step, through the trainer's own
`run_step` (the same code `qdylora train` runs).

    .venv/bin/python benchmarks/rule_speed.py [--steps 6] [--rounds 3] [--batch-size 8]

SmolLM2-135M-Instruct (embedded), NF4, rank-64 adapters on all 210 linears, the embedded ASDiv
training rows (chat template, loss on the answers), micro-batch 8, AdamW. One model is loaded
once; the rules take turns, interleaved (qlora-r64, step, example, sandwich, mixture, then again)
for --rounds rounds of --steps optimizer steps each on the same batches, after one warm-up step
per rule. Prints the median seconds per step of each rule and its ratio to qlora-r64.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

# "full" (the default) runs exactly the qlora-r64 step; its extra cost is the SVD ordering at
# each checkpoint and validation, timed below
RULES = {"qlora-r64": dict(min_rank=64, rank_rule="full"),
         "step": dict(rank_rule="step"), "example": dict(rank_rule="example"),
         "sandwich": dict(rank_rule="sandwich"), "mixture": dict(rank_rule="mixture")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    import torch

    from qdylora import QDyLoRAConfig, RunSettings, TrainSettings
    from qdylora.core.loading import load_tokenizer, resolve_source
    from qdylora.core.model import prepare
    from qdylora.core.ordering import svd_ordered
    from qdylora.data.batching import pad_token_id
    from qdylora.data.embedded import smollm2_checkpoint
    from qdylora.training.distributed import Processes
    from qdylora.training.settings import DataSettings
    from qdylora.data.datasets import load_data
    from qdylora.training.trainer import make_job, run_step

    source = smollm2_checkpoint()
    settings = RunSettings(adapter=QDyLoRAConfig(max_rank=64, alpha=16, dropout=0.05),
                           data=DataSettings().with_embedded_default(),
                           train=TrainSettings(micro_batch_size=args.batch_size, grad_accumulation=1))
    model = prepare(source, settings.adapter)
    tokenizer = load_tokenizer(resolve_source(source))
    data = load_data(settings.data, settings.adapter.seed, tokenizer)
    procs = Processes()  # one process
    times: dict[str, list[float]] = {name: [] for name in RULES}
    jobs = {}
    for name, spec in RULES.items():
        t = replace(settings.train, **spec)
        job = make_job(model, t, data.train, pad_token_id(tokenizer), procs)
        run_step(job, 0, ".")  # warm-up
        jobs[name] = job
    model.train()
    for _ in range(args.rounds):
        for name, job in jobs.items():
            for step in range(1, args.steps + 1):  # the same batches for every rule
                start = time.perf_counter()
                run_step(job, step, ".")
                times[name].append(time.perf_counter() - start)
    start = time.perf_counter()
    with svd_ordered(model):  # --order svd: once per checkpoint and per validation
        ordered = time.perf_counter() - start
    base = statistics.median(times["qlora-r64"])
    out = {"machine": machine.facts(), "steps_per_round": args.steps, "rounds": args.rounds,
           "batch_size": args.batch_size, "threads": torch.get_num_threads(),
           "seconds_per_step": {n: round(statistics.median(v), 3) for n, v in times.items()},
           "ratio_to_qlora_r64": {n: round(statistics.median(v) / base, 3) for n, v in times.items()},
           "svd_order_seconds": round(ordered, 3), "svd_order_in_steps": round(ordered / base, 3)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
