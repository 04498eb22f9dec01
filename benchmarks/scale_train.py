"""Train a model larger than this machine's RAM: load, train, sweep and export a 30B-shaped Llama.

The paper's headline (QDyLoRA fine-tunes Falcon-40B, ~80 GB in bf16, on one 32 GB GPU) at this
machine's scale. Writes a random bf16 checkpoint with LLaMA-30B's shapes (`scale_load.SHAPES`;
about 61 GiB: the free disk is checked first), with a 32,000-token BPE tokenizer trained here on
the embedded ASDiv text (SmolLM2's tokenizer and chat template, retrained to the model's vocab).
Then one child process runs what a user would: `qdylora.prepare` (NF4 + rank-64 adapters,
frozen weights in bfloat16), `qdylora.train` (sampled ranks, 8-bit AdamW stepped inside backward,
gradient checkpointing), a sweep of two ranks and a PEFT export of one, sampling its memory every
50 ms from /proc: anonymous memory (what the process really holds), file-backed RSS (the
checkpoint's memory-mapped pages: page cache the kernel can drop) and the system's MemAvailable.

    .venv/bin/python benchmarks/scale_train.py --shape 30b --keep /work/bench/ckpt30b [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402
import scale_load  # noqa: E402

GiB = 2**30


def add_tokenizer(path: str, vocab: int) -> None:
    """SmolLM2's tokenizer (pre-tokenizer, special tokens, chat template) retrained on the ASDiv
    text to at most `vocab` tokens, saved beside the checkpoint."""
    from transformers import AutoTokenizer

    from qdylora.data.embedded import smollm2_checkpoint
    from qdylora.data.rows import read_rows

    rows = read_rows("asdiv:train") + read_rows("asdiv:validation")
    texts = [" ".join(str(v) for v in row.values()) for row in rows]
    base = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    tokenizer = base.train_new_from_iterator(texts, vocab_size=vocab)
    tokenizer.save_pretrained(path)


def child(path: str, out: str, steps: int, ranks: list[int], sweep_rows: int, after_training: bool) -> None:
    """The user's pipeline in one process; prints one JSON line of results at the end (and after
    each phase, so a phase that fails leaves what came before)."""
    import torch

    import qdylora
    from qdylora.training.rundir import checkpoint_dirs

    sampler = scale_load.MemorySampler()
    result: dict = {"facts": machine.facts()} if after_training else {"facts": machine.facts(), "steps": steps}

    emit = lambda: _emit(result, sampler.peaks)  # noqa: E731

    if after_training:  # the run exists: open it (base + its adapter) for the sweep and the export
        sampler.enter("reopen")
        start = time.perf_counter()
        model, tokenizer, settings = qdylora.load_run(out, "cpu")
        result["reopen_s"] = time.perf_counter() - start
        result["after_reopen"] = scale_load.MemorySampler.now()
        emit()
        return _sweep_and_export(model, settings, path, out, ranks, sweep_rows, sampler, result)
    config = qdylora.QDyLoRAConfig(max_rank=64, frozen_dtype="bfloat16")
    sampler.enter("load")
    start = time.perf_counter()
    model = qdylora.prepare(path, config, device="cpu")
    result["load_s"] = time.perf_counter() - start
    result["memory_report"] = qdylora.memory_report(model).to_dict()
    result["after_load"] = scale_load.MemorySampler.now()
    emit()

    settings = qdylora.RunSettings(
        model=path, adapter=config,
        # the embedded ASDiv with its chat template, examples cut to 64 tokens: on 2 CPU cores a
        # 30B model's forward runs ~1 s per token in float32, so the tokens are kept few
        data=qdylora.DataSettings(val_max_examples=1, max_source_length=48, max_target_length=16),
        train=qdylora.TrainSettings(
            max_steps=steps, micro_batch_size=1, grad_accumulation=1, lr=2e-4, rank_rule="step",
            optim="adamw-8bit", optimizer_in_backward=True, max_grad_norm=0.0, grad_checkpointing=True,
            eval_ranks=",".join(map(str, ranks)), save_every=0, keep_last=1),
    )
    step_memory = []
    sampler.enter("train")
    start = time.perf_counter()
    summary = qdylora.train(settings, out, model=model, progress=False,
                            on_step=lambda step: step_memory.append(scale_load.MemorySampler.now()))
    result["train_s"] = time.perf_counter() - start
    result["summary"] = summary
    result["step_memory"] = step_memory
    metrics = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines() if line.strip()]
    result["step_metrics"] = [m for m in metrics if "grad_norm" in m]
    state = torch.load(checkpoint_dirs(Path(out))[-1] / "state.pt", map_location="cpu", weights_only=True, mmap=True)
    result["optimizer_state_bytes"] = sum(
        t.numel() * t.element_size() for inner in state["optimizer"]["inner"] for s in inner["state"].values()
        for v in s.values() for t in (v.values() if isinstance(v, dict) else [v]) if isinstance(t, torch.Tensor))
    emit()
    _sweep_and_export(model, settings, path, out, ranks, sweep_rows, sampler, result)


def _sweep_and_export(model, settings, path: str, out: str, ranks: list[int], sweep_rows: int,
                      sampler: scale_load.MemorySampler, result: dict) -> None:
    import qdylora
    from qdylora.core.loading import load_tokenizer, resolve_source
    from qdylora.evaluation.sweep import eval_format
    from qdylora.export.peft import export_peft

    sampler.enter("sweep")
    start = time.perf_counter()
    tokenizer = load_tokenizer(resolve_source(path))
    # the shortest test rows: the run's 48-token prompt limit drops longer ones
    rows = sorted(qdylora.read_rows("asdiv:test"), key=lambda r: len(r["passage"]) + len(r["question"]))[:sweep_rows]
    data = eval_format(settings.data.with_embedded_default(), None)
    sweep = qdylora.run_sweep(model, tokenizer, rows, data, ranks, qdylora.SweepSettings(metrics="loss", batch_size=2),
                              progress=False)
    result["sweep_s"] = time.perf_counter() - start
    result["sweep_loss"] = {str(r): v for r, v in sweep.values["loss"].items()}
    _emit(result, sampler.peaks)

    sampler.enter("export")
    start = time.perf_counter()
    export_peft(model, ranks[0], Path(out) / f"peft-rank-{ranks[0]}")
    result["export_s"] = time.perf_counter() - start
    _emit(result, sampler.stop())


def _emit(result: dict, peaks: dict) -> None:
    """One JSON line of everything so far (the parent keeps the last one it gets)."""
    result["peaks"] = peaks
    print(json.dumps(result), flush=True)


def report(result: dict, checkpoint_bytes: int) -> None:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rep, peaks = result["memory_report"], result["peaks"]
    print(json.dumps(result["facts"]))
    print(f"machine RAM                      {ram / GiB:7.2f} GiB")
    print(f"checkpoint (bf16)                {checkpoint_bytes / GiB:7.2f} GiB  ({checkpoint_bytes / ram:.2f}x RAM)")
    for name in ("quantized", "other", "adapter", "total"):
        part = rep[name]
        print(f"model {name:<26} {part['bytes'] / GiB:7.2f} GiB  ({part['params'] / 1e9:.2f} B params, "
              f"{part['bits_per_param']:.3f} bits/param)")
    if "optimizer_state_bytes" in result:
        print(f"8-bit AdamW state                {result['optimizer_state_bytes'] / GiB:7.2f} GiB")
    for phase, p in peaks.items():
        if phase == "start":
            continue
        print(f"peak {phase:<8} anon {p['anon'] / GiB:6.2f} GiB  file-backed {p['file'] / GiB:6.2f} GiB  "
              f"RSS {p['rss'] / GiB:6.2f} GiB  lowest MemAvailable {p['min_available'] / GiB:6.2f} GiB")
    whole = max(p["anon"] for k, p in peaks.items() if k != "start")
    print(f"peak anonymous memory, whole run {whole / GiB:7.2f} GiB")
    if "load_s" in result:
        print(f"load + quantize                  {result['load_s']:7.0f} s")
    if "reopen_s" in result:
        print(f"reopen the run (load + adapter)  {result['reopen_s']:7.0f} s")
    if "train_s" in result:
        for m in result["step_metrics"]:
            print(f"  step {m['step']}: rank {m['rank']}, loss {m['loss']:.3f}, {m['seconds']:.0f} s")
        print(f"train ({result['steps']} steps, validation, checkpoint) {result['train_s']:.0f} s; "
              f"val loss after {result['summary']['val_loss_after']}")
    if "sweep_s" in result:
        print(f"sweep (loss, ASDiv test rows)    {result['sweep_s']:7.0f} s  {result['sweep_loss']}")
    if "export_s" in result:
        print(f"PEFT export                      {result['export_s']:7.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(scale_load.SHAPES), default="30b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ranks", default="8,64", help="ranks validated and swept; the first is exported")
    parser.add_argument("--sweep-rows", type=int, default=2, help="ASDiv test rows the sweep scores")
    parser.add_argument("--after-training", action="store_true",
                        help="reopen the finished run in --out for the sweep and the export (merged into --json)")
    parser.add_argument("--keep", help="write the checkpoint here and keep it (reused if present)")
    parser.add_argument("--out", help="the run directory (default: a temporary one)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.child:
        child(args.child[0], args.child[1], args.steps, ranks, args.sweep_rows, args.after_training)
        return

    path = args.keep or tempfile.mkdtemp(prefix=f"qdylora-{args.shape}-")
    out = args.out or tempfile.mkdtemp(prefix="qdylora-run-")
    try:
        if not os.path.exists(os.path.join(path, "model.safetensors.index.json")):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            print(f"writing a {args.shape}-shaped checkpoint to {path} ({free / GiB:.0f} GiB free)", file=sys.stderr)
            os.makedirs(path, exist_ok=True)
            scale_load.write_checkpoint(path, args.shape)
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            add_tokenizer(path, scale_load.VOCAB)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not args.after_training:
            shutil.rmtree(out, ignore_errors=True)  # train() makes it
        cmd = [sys.executable, __file__, "--child", path, out, "--steps", str(args.steps), "--ranks", args.ranks,
               "--sweep-rows", str(args.sweep_rows)] + (["--after-training"] if args.after_training else [])
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            sys.exit(f"the child process failed (exit {proc.returncode}) before its first result")
        result = json.loads(lines[-1])
        if args.after_training and args.json and Path(args.json).exists():  # the training's figures too
            earlier = json.loads(Path(args.json).read_text())
            result = {**earlier, **result, "peaks": {**earlier.get("peaks", {}), **result["peaks"]}}
        if proc.returncode != 0:
            print(f"the child stopped (exit {proc.returncode}): figures up to its last phase", file=sys.stderr)
        report(result, size)
        if args.json:
            Path(args.json).write_text(json.dumps({"checkpoint_bytes": size, **result}, indent=1) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
