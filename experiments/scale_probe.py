"""Issue 39, a measurement before a feature: does the first tenth of a run tell which of the two
scales of the field (PEFT's alpha / R, k = 1, and rsLoRA's alpha / sqrt(R), k = sqrt(R) = 8) a
task wants?

    .venv/bin/python experiments/scale_probe.py --cell qwen:asdiv:5e-4 --cell smollm2:cipher:1e-3 ...

For each cell (model : task : lr) and each scale, the study's own run settings (qwen_study /
recipe_study) train the first --fraction of their steps; the schedule is that of the whole run
(warmup, then near its peak: constant here, which a cosine over 10x the steps is within 1 % of).
Every scale sees the same batches, so the training losses are paired; each batch is seen once,
before its update, so a step's loss is a held-out loss. Printed: the mean over the second half
of the probe's steps per scale, and which scale it picks. Results: OUT/<cell>.json (resumable).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SCALES = {"k1": ("standard", 1.0), "k8": ("rslora", 1.0)}  # rank 64: alpha / 64 and alpha / sqrt(64)


def cell_settings(cell: str, scale: str, seed: int):
    """The run settings of `cell`'s study at `scale` (rank 64, every step at rank 64)."""
    model, task, lr = cell.split(":")
    rule, _ = SCALES[scale]
    if model == "qwen":
        import qwen_study

        from qdylora.data.study_models import QWEN_05B, study_checkpoint

        args = argparse.Namespace(steps=100, lr=float(lr), model=str(study_checkpoint(QWEN_05B)))
        settings = qwen_study.settings_for("k1", seed, args)
    else:
        import recipe_study

        settings = recipe_study.settings_for(task, "k1-svd", seed)
        settings = replace(settings, train=replace(settings.train, lr=float(lr)))
    return replace(settings, adapter=replace(settings.adapter, scaling=rule))


def probe(cell: str, scale: str, seed: int, fraction: float, out: Path) -> list[float]:
    """The training losses of the first `fraction` of the cell's run at `scale`."""
    from qdylora.training.trainer import train

    settings = cell_settings(cell, scale, seed)
    t = settings.train
    steps = max(4, round(t.max_steps * fraction))
    t = replace(t, max_steps=steps, schedule="constant", eval_every=0, save_every=0, order="none", gain_rows=0)
    settings = replace(settings, train=t, data=replace(settings.data, val_max_examples=1))
    run = out / "runs" / f"{cell.replace(':', '-')}-{scale}-seed{seed}"
    train(settings, run, overwrite=True, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r and "rank" in r]


def main() -> None:
    import sys

    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", action="append", required=True,
                    help="model:task:lr (qwen:asdiv:5e-4, smollm2:cipher:1e-3)")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "scale-probe"))
    args = ap.parse_args()
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    for cell in args.cell:
        path = out / "results" / f"{cell.replace(':', '-')}-seed{args.seed}.json"
        if path.exists():
            result = json.loads(path.read_text())
        else:
            result = {"cell": cell, "seed": args.seed, "fraction": args.fraction, "losses": {}, "seconds": {}}
            for scale in SCALES:
                start = time.perf_counter()
                result["losses"][scale] = probe(cell, scale, args.seed, args.fraction, out)
                result["seconds"][scale] = round(time.perf_counter() - start, 1)
            path.write_text(json.dumps(result, indent=1) + "\n")
        half = {s: sum(ls[len(ls) // 2:]) / len(ls[len(ls) // 2:]) for s, ls in result["losses"].items()}
        pick = min(half, key=half.get)
        print(f"{cell}: second-half training loss " + ", ".join(f"{s} {v:.3f}" for s, v in half.items())
              + f" -> {pick}  ({result['seconds']} s)")


if __name__ == "__main__":
    main()
