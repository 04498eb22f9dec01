"""Training throughput, memory and FLOP utilization: qdylora against the QLoRA stack.

    .venv/bin/python benchmarks/train_speed.py [--steps 8] [--rounds 2] [--batch-size 8] [--dtype auto] [--device cpu]

SmolLM2-135M-Instruct (the embedded checkpoint) on ASDiv training rows rendered with the chat
template (short prompts, short answers; loss on the answers), batch 8, LoRA on all 7 projections,
rank 64, alpha 16, dropout 0.05, AdamW lr 2e-4, gradient clipping 0.3, the same compute dtype
for everyone. Competitors, each in its own child process (so each gets its own peak RSS),
interleaved A B C ... A B C ... for `--rounds` rounds:

  reference          transformers + bitsandbytes NF4 (BitsAndBytesConfig, double quant) + PEFT
                     LoRA (prepare_model_for_kbit_training without checkpointing), loss from
                     the model's `labels`, batches in random order (the Trainer's default)
  reference-grouped  the same stack on qdylora's length-grouped batches
  peft-dense         PEFT LoRA on the unquantized base (the reference's cost of quantization)
  qdylora-r64        qdylora at its max rank 64
  qdylora-sampled    qdylora with a rank drawn from 1..64 per step (the step rule;
                     benchmarks/rule_speed.py times every rule)
  qdylora-dense      qdylora's layers on the unquantized base (our cost of quantization)

Each child runs the same examples (`--steps` x batch, drawn from the training split with a fixed
seed) after 2 warm-up steps, and reports supervised (answer) tokens/s, peak RSS of the whole
process and during the steps (VmHWM reset after loading; with --device cuda, the peak GPU memory
torch allocated instead), and, in the first round, the
matmul FLOPs of its steps (torch.utils.flop_counter) for the FLOP utilization against the
matrix-multiply rate measured in the same run. Medians over rounds; ratios are what to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMPETITORS = {  # name: (stack, quantized, length-grouped batches)
    "reference": ("peft", True, False),
    "reference-grouped": ("peft", True, True),
    "peft-dense": ("peft", False, True),
    "qdylora-r64": ("qdylora", True, True),
    "qdylora-sampled": ("qdylora", True, True),
    "qdylora-dense": ("qdylora", False, True),
}
RANK, ALPHA, DROPOUT, LR, CLIP, WARMUP = 64, 16, 0.05, 2e-4, 0.3, 2


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (Linux >= 4.0)
        f.write("5")


def _examples(tokenizer, n: int, seed: int = 0):
    """`n` ASDiv training examples, as the embedded default renders them."""
    import torch

    from qdylora.data.embedded import asdiv_split
    from qdylora.data.rows import row_format, tokenize
    from qdylora.training.settings import DataSettings

    d = DataSettings().with_embedded_default()
    rows = asdiv_split("train")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()[:n]
    picked = [rows[i] for i in order]
    rf = row_format(d, picked[0].keys(), d.data)
    examples, _ = tokenize(picked, tokenizer, rf, max_source_length=d.max_source_length,
                           max_target_length=d.max_target_length)
    return examples


def _batches(examples, batch_size: int, grouped: bool):
    """Length-grouped (qdylora's order) or random batches of the same examples."""
    from qdylora.data.batching import epoch_order

    order = epoch_order([len(e) for e in examples], batch_size, seed=0, epoch=0, group_by_length=grouped)
    return [[examples[i] for i in b] for b in order]


def _peft_model(path, quantized, dtype, device):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from qdylora.core.loading import bnb_config

    kwargs = {"quantization_config": bnb_config(dtype)} if quantized else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device}, **kwargs)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS,
                        bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(0)
    return get_peft_model(model, config)


def _qdylora_model(path, quantized, dtype_name, device):
    import qdylora
    from qdylora.core.layer import QDyLoRALinear
    from qdylora.core.targets import block_linears

    config = qdylora.QDyLoRAConfig(max_rank=RANK, alpha=ALPHA, dropout=DROPOUT, compute_dtype=dtype_name)
    if quantized:
        return qdylora.prepare(path, config, device=device)
    # The same adapter layers beside dense linears: only the storage of the base differs.
    import torch
    from transformers import AutoModelForCausalLM

    config = config.resolved_for(torch.device(device))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=config.torch_compute_dtype).to(device)
    for p in hf.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for name, layer in block_linears(hf).items():
        parent, _, child = name.rpartition(".")
        setattr(hf.get_submodule(parent), child, QDyLoRALinear(
            layer, RANK, ALPHA, dropout=DROPOUT, compute_dtype=config.torch_compute_dtype, generator=g))
    return qdylora.QDyLoRAModel(hf, config, path)


def child(name: str, steps: int, batch_size: int, dtype_name: str, count_flops: bool, device_name: str = "cpu") -> dict:
    import torch
    from transformers import AutoTokenizer

    from qdylora.core.devices import fast_compute_dtype
    from qdylora.core.rank import set_rank
    from qdylora.data.batching import collate, pad_token_id
    from qdylora.data.embedded import smollm2_checkpoint
    from qdylora.data.rows import IGNORE
    from qdylora.training.losses import autocast_context, loss_sum
    from qdylora.training.sampling import RankSampler

    stack, quantized, grouped = COMPETITORS[name]
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = fast_compute_dtype(device) if dtype_name == "auto" else getattr(torch, dtype_name)
    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples = _examples(tokenizer, (steps + WARMUP) * batch_size)
    warm, timed = examples[: WARMUP * batch_size], examples[WARMUP * batch_size:]
    batches = _batches(warm, batch_size, grouped) + _batches(timed, batch_size, grouped)
    pad = pad_token_id(tokenizer)

    start = time.perf_counter()
    if stack == "peft":
        model = _peft_model(path, quantized, dtype, device_name)
    else:
        model = _qdylora_model(path, quantized, str(dtype).removeprefix("torch."), device_name)
    load_s = time.perf_counter() - start
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    sampler = RankSampler(RANK, 1, seed=0)
    autocast = lambda: autocast_context(device, dtype, dtype != torch.float32)  # noqa: E731
    model.train()
    torch.manual_seed(0)

    def step(i: int, examples_) -> tuple[int, int]:
        batch = {k: v.to(device) for k, v in collate(examples_, pad).items()}  # (B, T) each
        if stack == "qdylora":
            set_rank(model, sampler.rank_at(i) if name == "qdylora-sampled" else RANK)
            with autocast():
                total, n = loss_sum(model, batch)
            (total / n).backward()
        else:
            with autocast():
                loss = model(**batch).loss  # transformers' mean over the labelled tokens
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int((batch["labels"][:, 1:] != IGNORE).sum()), batch["input_ids"].numel()

    for i, b in enumerate(batches[:WARMUP]):
        step(i, b)
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_device_load = torch.cuda.max_memory_allocated(device) if cuda else None
    _reset_hwm()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, supervised, padded = [], 0, 0
    for i, b in enumerate(batches[WARMUP:], start=WARMUP):
        sync()
        t0 = time.perf_counter()
        s, p = step(i, b)
        sync()
        times.append(time.perf_counter() - t0)
        supervised, padded = supervised + s, padded + p
    result = {
        "name": name, "load_s": load_s, "step_s": times, "seconds": sum(times),
        "supervised_tokens": supervised, "padded_tokens": padded,
        "supervised_tok_s": supervised / sum(times),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_steps": _hwm_bytes(), "peak_rss_load_warmup": peak_load,
        "peak_device_steps": torch.cuda.max_memory_allocated(device) if cuda else None,
        "peak_device_load_warmup": peak_device_load,
        "trainable_params": sum(p.numel() for p in params),
        "ranks": [sampler.rank_at(i) if name == "qdylora-sampled" else RANK
                  for i in range(WARMUP, len(batches))],
    }
    if count_flops:  # the same steps again, counted (not timed): forward + backward matmuls
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False, custom_mapping=_bnb_flop_formulas())
        with counter:
            for i, b in enumerate(batches[WARMUP:], start=WARMUP):
                step(i, b)
        result["flops"] = counter.get_total_flops()
    return result


def _bnb_flop_formulas() -> dict:
    """bitsandbytes' fused 4-bit matmul is a custom op the counter does not know: 2 M N K."""
    import math

    import torch

    def gemm_4bit(a_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(out_shape) * a_shape[-1]

    return {torch.ops.bitsandbytes.gemm_4bit: gemm_4bit}


def run_child(args, name: str, count_flops: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--device", args.device] + \
        (["--count-flops"] if count_flops else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="auto", help="compute dtype for everyone: auto, float32, bfloat16")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (everyone on it)")
    ap.add_argument("--only", help="comma-separated competitors (default: all)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch_size, args.dtype, args.count_flops, args.device)))
        return

    import torch

    names = args.only.split(",") if args.only else list(COMPETITORS)
    facts = machine.facts()
    print(json.dumps(facts), flush=True)
    rates = {"float32": [machine.matmul_gflops(torch.float32, device=args.device)]}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            res = run_child(args, n, count_flops=(r == 0))
            runs[n].append(res)
            print(f"round {r + 1} {n:18s} {res['supervised_tok_s']:7.1f} supervised tok/s  "
                  f"step {statistics.median(res['step_s']):5.2f} s  peak RSS {res['peak_rss'] / 2**30:.2f} GiB",
                  flush=True)
        rates["float32"].append(machine.matmul_gflops(torch.float32, device=args.device))
    fast_bf16 = args.device == "cuda" or facts["bf16_matmul_in_hardware"] != "no (emulated)"
    rates["bfloat16"] = [machine.matmul_gflops(torch.bfloat16, n=2048 if fast_bf16 else 1024, device=args.device)]
    _report(args, names, runs, rates, facts)


def _report(args, names, runs, rates, facts) -> None:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    summary = {}
    for n in names:
        rs = runs[n]
        summary[n] = {
            "supervised_tok_s": med([x["supervised_tok_s"] for x in rs]),
            "step_s": med([med(x["step_s"]) for x in rs]),
            "peak_rss_gib": med([x["peak_device_steps" if args.device == "cuda" else "peak_rss"] for x in rs]) / 2**30,
            "peak_rss_steps_gib": med([x["peak_rss_steps"] for x in rs]) / 2**30,
            "load_s": med([x["load_s"] for x in rs]),
            "padding": 1 - rs[0]["supervised_tokens"] / rs[0]["padded_tokens"],
            "flops_per_s": rs[0]["flops"] / med([x["seconds"] for x in rs]),
            "mean_rank": statistics.mean(rs[0]["ranks"]),
        }
    if args.dtype == "auto":
        dtype = ("bfloat16" if args.device == "cuda" or facts["bf16_matmul_in_hardware"] != "no (emulated)"
                 else "float32")
    else:
        dtype = args.dtype
    peak = med(rates.get(dtype, rates["float32"])) * 1e9
    if args.device == "cuda":
        print(f"\ndevice: {facts['gpu']} (the peak column: GPU memory torch allocated during the steps)")
    print(f"\nmachine: {facts['cpu']}, {facts['cores']} cores, {facts['ram_gib']} GiB, bf16 in hardware: "
          f"{facts['bf16_matmul_in_hardware']}, torch {facts['torch']}, {facts['threads']} threads")
    print(f"matmul rate (2048^3): float32 {med(rates['float32']):.1f} GFLOP/s; bfloat16 "
          f"{med(rates['bfloat16']):.1f} GFLOP/s; compute dtype {dtype}")
    print(f"SmolLM2-135M-Instruct, ASDiv, batch {args.batch_size}, rank {RANK}, {args.steps} steps x "
          f"{args.rounds} rounds (medians)\n")
    ref = summary.get("reference")
    head = f"{'':18s} {'sup tok/s':>9s} {'x ref':>6s} {'step s':>7s} {'peak RSS':>9s} {'x ref':>6s} " \
           f"{'RSS steps':>9s} {'MFU':>6s} {'pad+prompt':>10s}"
    print(head)
    for n, s in summary.items():
        speed = f"{s['supervised_tok_s'] / ref['supervised_tok_s']:6.2f}" if ref else "     -"
        mem = f"{s['peak_rss_gib'] / ref['peak_rss_gib']:6.2f}" if ref else "     -"
        print(f"{n:18s} {s['supervised_tok_s']:9.1f} {speed} {s['step_s']:7.2f} {s['peak_rss_gib']:8.2f}G "
              f"{mem} {s['peak_rss_steps_gib']:8.2f}G {s['flops_per_s'] / peak:6.1%} {s['padding']:10.1%}")
    for q, d in (("qdylora-r64", "qdylora-dense"), ("reference-grouped", "peft-dense")):
        if q in summary and d in summary:
            print(f"cost of quantization, {q} / {d} step time: {summary[q]['step_s'] / summary[d]['step_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"facts": facts, "rates": rates, "summary": summary, "runs": runs,
                       "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
