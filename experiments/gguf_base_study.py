"""Issue 40: the same run on the NF4 base and on the GGUF file's own blocks (--base-format).

For SmolLM2-135M-Instruct (the embedded Q4_1 GGUF) and, with --qwen, the Qwen2.5-0.5B Q4_K_M
runs of experiments/qwen_study.py (k1 = NF4, k1-gguf = the file's blocks; train them there):

1. train (SmolLM2: 100 steps of 8 ASDiv rows, lr 5e-4, cosine, 5 warmup steps, bf16 where the
   CPU has it): step time and peak memory from the run's summary;
2. sweep: test answer loss and exact match at ranks 1, 8, 64 on the first --test-rows ASDiv test
   rows (every rank on every row);
3. experiments/gguf_check.py on the run: our base against llama.cpp on the original GGUF and
   against the unquantized model, and the exported adapter's change in llama.cpp on the original
   file (top-1 agreement), at ranks 1, 8, 64.

    .venv/bin/python experiments/gguf_base_study.py              # SmolLM2, both formats (resumable)
    .venv/bin/python experiments/gguf_base_study.py --qwen       # gguf_check on the Qwen runs
    .venv/bin/python experiments/gguf_base_study.py --report     # the table

Results: experiments/gguf-base/<model>-<format>.json (one per finished step).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

OUT = Path("experiments/gguf-base")
QWEN_RUNS = {"nf4": "experiments/qwen-study-lr2e-4/runs/k1-seed0",
             "gguf": "experiments/qwen-study-lr2e-4/runs/k1-gguf-seed0"}


def train_smollm2(fmt: str, steps: int) -> Path:
    from qdylora import QDyLoRAConfig
    from qdylora.training.rundir import read_json
    from qdylora.training.settings import DataSettings, RunSettings, TrainSettings
    from qdylora.training.trainer import train

    run = OUT / "runs" / f"smollm2-{fmt}"
    if not (run / "summary.json").exists() or read_json(run / "summary.json").get("status") != "done":
        settings = RunSettings(adapter=QDyLoRAConfig(base_format=fmt),
                               data=DataSettings(val_max_examples=32),
                               train=TrainSettings(max_steps=steps, micro_batch_size=8, grad_accumulation=1, lr=5e-4,
                                                   schedule="cosine", warmup_steps=5, eval_every=0, save_every=0))
        train(settings, run, overwrite=True, progress=False)
    return run


def sweep(run: Path, rows: int) -> dict:
    from qdylora.evaluation.settings import SweepSettings
    from qdylora.evaluation.sweep import sweep_run

    settings = SweepSettings(data="asdiv:test", ranks="1,8,64", max_examples=rows, max_new_tokens=16, exhaustive=True)
    result, _ = sweep_run(run, settings, out=run / "sweep", overwrite=True, progress=False)
    return {v: {str(r): x for r, x in by.items()} for v, by in result.values.items()} | {
        "intervals": {v: {str(r): list(i) for r, i in by.items()} for v, by in result.intervals.items()}}


def check(run: Path, name: str, answers: int) -> dict:
    out = OUT / f"{name}-gguf-check.json"
    if not out.exists():
        subprocess.run([sys.executable, "experiments/gguf_check.py", str(run), "--ranks", "1", "8", "64",
                        "--prompts", "8", "--answers", str(answers), "--out", str(out)], check=True)
    return json.loads(out.read_text())


def step(name: str, work) -> dict:
    path = OUT / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = work()
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def report() -> None:
    print("| model, base | step s | peak GiB | loss r1 / r8 / r64 | exact match r1 / r8 / r64 | "
          "base vs llama.cpp file: rel / top-1 | base vs unquantized | adapter on the file: top-1 r1 / r8 / r64 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model in ("smollm2", "qwen"):
        for fmt in ("nf4", "gguf"):
            train = OUT / f"{model}-{fmt}.json"
            c = OUT / f"{model}-{fmt}-gguf-check.json"
            if not (train.exists() and c.exists()):
                continue
            t, g = json.loads(train.read_text()), json.loads(c.read_text())
            f = g["floor"]
            loss = " / ".join(f"{t['loss'][r]:.3f}" for r in ("1", "8", "64"))
            em = " / ".join(f"{t['exact_match'][r]:.1f}" for r in ("1", "8", "64"))
            top = " / ".join(f"{g['on_base_gguf'][r]['top1_on']:.3f}" for r in ("1", "8", "64"))
            step_s, peak = t.get("step_seconds", float("nan")), t.get("peak_gib", float("nan"))
            print(f"| {model}, {fmt} | {step_s:.2f} | {peak:.2f} | "
                  f"{loss} | {em} | {f['base_gguf']['relative']:.4f} / {f['base_gguf']['top1']:.3f} | "
                  f"{f['unquantized_vs_nf4']['relative']:.4f} | {top} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--test-rows", type=int, default=200)
    ap.add_argument("--answers", type=int, default=20)
    ap.add_argument("--formats", default="nf4,gguf")
    ap.add_argument("--qwen", action="store_true")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        return report()
    OUT.mkdir(parents=True, exist_ok=True)
    from qdylora.training.rundir import read_json

    for fmt in args.formats.split(","):
        if args.qwen:  # the qwen_study runs with their gains (NAME+gains), measured there
            run = Path(QWEN_RUNS[fmt])
            res = json.loads((run.parent.parent / "results" / f"{run.name.replace('-seed', '+gains-seed')}.json")
                             .read_text())
            step(f"qwen-{fmt}", lambda: {"format": fmt, "step_seconds": res["train_seconds"] / res["steps"],
                                         "peak_gib": (res.get("peak_memory_bytes") or 0) / 2**30,
                                         "loss": res["values"]["loss"], "exact_match": res["values"]["exact_match"],
                                         "intervals": res["intervals"]})
            check(run, f"qwen-{fmt}", args.answers)
            continue
        run = train_smollm2(fmt, args.steps)

        def measured(run=run):
            summary = read_json(run / "summary.json")
            return {"format": fmt, "steps": summary["steps"], "step_seconds": summary["seconds"] / summary["steps"],
                    "peak_gib": summary["peak_memory_bytes"] / 2**30, **sweep(run, args.test_rows)}

        step(f"smollm2-{fmt}", measured)
        check(run, f"smollm2-{fmt}", args.answers)
        print(f"done: smollm2 {fmt}", flush=True)


if __name__ == "__main__":
    main()
