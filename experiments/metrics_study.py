"""Every sweep metric on real data with the embedded SmolLM2-135M-Instruct: what fine-tuning on
ASDiv does to MMLU at every rank, ROUGE / BLEU on XSum, and lm-evaluation-harness on a local
MMLU task against our `choice` metric on the same rows and prompt.

    .venv/bin/python experiments/metrics_study.py --asdiv-run RUN --cipher-run RUN2 \
        [--mmlu-rows 150] [--xsum-rows 24] [--bridge-rows 24]

RUN is a finished `qdylora train` run on asdiv:train (the default recipe; the chat template);
RUN2 a run without a chat template (the harness is called without one), e.g. a cipher run of
experiments/recipe_study.py. Results go to experiments/metrics-study/ (sweep.json, .csv, .png of
each part, and summary.json), and a summary with wall times is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qdylora.data.rows import read_rows
from qdylora.evaluation.harness import write_choice_task
from qdylora.evaluation.settings import SweepSettings
from qdylora.evaluation.sweep import sweep_run, table

RANKS = [1, 2, 4, 8, 16, 32, 64]
OUT = Path(__file__).resolve().parent / "metrics-study"

def timed_sweep(name: str, run: str, **kwargs) -> dict:
    start = time.perf_counter()
    settings = SweepSettings(ranks=",".join(map(str, RANKS)), **kwargs)
    result, _ = sweep_run(run, settings, out=OUT / name, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    print(f"== {name}: {result.examples} rows, {seconds:.0f} s wall ({result.seconds})")
    print(table(result))
    return {"seconds": seconds, "parts": result.seconds, "values": result.values}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--asdiv-run", required=True)
    ap.add_argument("--cipher-run", required=True)
    ap.add_argument("--mmlu-rows", type=int, default=150)
    ap.add_argument("--xsum-rows", type=int, default=24)
    ap.add_argument("--bridge-rows", type=int, default=24)
    ap.add_argument("--parts", default="mmlu,xsum,bridge")
    args = ap.parse_args()
    parts = args.parts.split(",")
    summary = {}
    if "mmlu" in parts:
        summary["mmlu"] = timed_sweep("asdiv-on-mmlu", args.asdiv_run, data="mmlu:test", max_examples=args.mmlu_rows,
                                      metrics="loss,exact_match,choice", batch_size=4, max_new_tokens=16)
    if "xsum" in parts:
        summary["xsum"] = timed_sweep("asdiv-on-xsum", args.asdiv_run, data="xsum:test", max_examples=args.xsum_rows,
                                      metrics="rouge,bleu", batch_size=4, max_new_tokens=48)
    if "bridge" in parts:
        # the first MMLU questions as a local lm-eval task prompting as our `choice` metric does
        tasks = write_choice_task(read_rows("mmlu:test")[:args.bridge_rows], OUT / "bridge", "mmlu_local")
        summary["bridge"] = timed_sweep("bridge", args.cipher_run, data=str(OUT / "bridge" / "mmlu_local.jsonl"),
                                        metrics="choice", batch_size=4, lm_eval="mmlu_local",
                                        lm_eval_include=str(tasks))
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
