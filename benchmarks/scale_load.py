"""Load a Llama checkpoint bigger than half of this machine's RAM, in 4-bit, and train one step.

Writes a synthetic Llama checkpoint with real 7B- or 13B-shaped layers (random bf16 safetensors
shards) to a temporary directory, then, in a child process, runs `qdylora.prepare` on it and
(optionally) one training step at a short sequence length. Reports the checkpoint size, load
time, peak anonymous memory (sampled from /proc: file-backed mmap pages of the checkpoint are
reclaimable page cache, so peak RSS alone would overstate what loading needs) and peak RSS.

    .venv/bin/python benchmarks/scale_load.py --shape 7b [--train-step] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

SHAPES = {  # Llama-2 dimensions
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "30b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52),  # LLaMA-1 30B
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
}
VOCAB = 32000


def write_checkpoint(path: str, shape: str) -> int:
    """Random bf16 Llama weights, one shard per few layers. Returns bytes written."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    dims = SHAPES[shape]
    config = LlamaConfig(vocab_size=VOCAB, num_key_value_heads=dims["num_attention_heads"],
                         max_position_embeddings=4096, dtype="bfloat16", **dims)
    config.save_pretrained(path)
    h, m = dims["hidden_size"], dims["intermediate_size"]
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, total, shard = {}, 0, 0
    layers = list(range(dims["num_hidden_layers"]))
    groups = [layers[i : i + 2] for i in range(0, len(layers), 2)]
    for index, group in enumerate(groups + [None]):
        tensors = {}
        if group is None:  # embeddings, final norm, head
            tensors = {"model.embed_tokens.weight": rand(VOCAB, h),
                       "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                       "lm_head.weight": rand(VOCAB, h)}
        else:
            for i in group:
                p = f"model.layers.{i}."
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    tensors[p + f"self_attn.{name}.weight"] = rand(h, h)
                tensors[p + "mlp.gate_proj.weight"] = rand(m, h)
                tensors[p + "mlp.up_proj.weight"] = rand(m, h)
                tensors[p + "mlp.down_proj.weight"] = rand(h, m)
                tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
                tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        name = f"model-{index + 1:05d}-of-{len(groups) + 1:05d}.safetensors"
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
        shard += 1
        print(f"  wrote shard {shard}/{len(groups) + 1}", file=sys.stderr, flush=True)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


class MemorySampler:
    """Peaks of this process's anonymous and file-backed RSS, and the lowest MemAvailable, per
    phase, sampled every `interval` seconds from /proc."""

    def __init__(self, interval: float = 0.05) -> None:
        self.phase, self.peaks, self.interval = "start", {}, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> dict:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmRSS"):
                    values[key] = int(rest.split()[0]) * 1024
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemAvailable", "Cached"):
                    values[key] = int(rest.split()[0]) * 1024
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            v = self.now()
            p = self.peaks.setdefault(self.phase, {"anon": 0, "file": 0, "rss": 0, "min_available": 1 << 62})
            p["anon"], p["file"] = max(p["anon"], v["RssAnon"]), max(p["file"], v["RssFile"])
            p["rss"] = max(p["rss"], v["VmRSS"])
            p["min_available"] = min(p["min_available"], v["MemAvailable"])
            time.sleep(self.interval)

    def enter(self, phase: str) -> None:
        time.sleep(2 * self.interval)  # the last phase's final state is sampled
        self.phase = phase

    def stop(self) -> dict:
        time.sleep(2 * self.interval)
        self._stop.set()
        self._thread.join()
        return self.peaks


def child(path: str, train_step: bool) -> None:
    """Runs in a fresh process: prepare (and a step), reporting times and memory as JSON."""
    import torch

    import qdylora

    sampler = MemorySampler()  # phase "start": the loading
    result = {}
    start = time.perf_counter()
    model = qdylora.prepare(path, qdylora.QDyLoRAConfig(max_rank=64), device="cpu")
    result["load_s"] = time.perf_counter() - start
    sampler.enter("step")
    result["peak_anon_after_load"] = sampler.peaks["start"]["anon"]
    report = qdylora.memory_report(model)
    result["memory_report"] = report.to_dict()
    result["peak_anon"] = sampler.peaks["start"]["anon"]
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result), flush=True)  # the load figures survive a step that fails or is stopped
    if train_step:
        torch.manual_seed(0)
        x = torch.randint(0, VOCAB, (1, 32))
        opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-4)
        model.train()
        qdylora.set_rank(model, 8)
        start = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        result["step_s"] = time.perf_counter() - start
        result["loss"] = loss.item()
    result["peak_anon"] = max(p["anon"] for p in sampler.stop().values())
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--train-step", action="store_true")
    parser.add_argument("--keep", help="write the checkpoint here and keep it (reused if present)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.train_step)
        return

    path = args.keep or tempfile.mkdtemp(prefix=f"qdylora-{args.shape}-")
    try:
        if not os.path.exists(os.path.join(path, "model.safetensors.index.json")):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            print(f"writing a {args.shape}-shaped checkpoint to {path} ({free / 2**30:.0f} GiB free)", file=sys.stderr)
            start = time.perf_counter()
            os.makedirs(path, exist_ok=True)
            size = write_checkpoint(path, args.shape)
            print(f"  {size / 2**30:.1f} GiB in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
        cmd = [sys.executable, __file__, "--child", path] + (["--train-step"] if args.train_step else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if not lines:
            sys.exit(f"the child process failed:\n{out.stderr[-2000:]}")
        result = json.loads(lines[-1])
        if out.returncode != 0:
            print(f"the training step did not finish (exit {out.returncode}); load figures only", file=sys.stderr)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import machine

        print(json.dumps(machine.facts()))
        q = result["memory_report"]["quantized"]
        print(f"machine RAM                 {ram / 2**30:6.1f} GiB")
        print(f"checkpoint (bf16)           {size / 2**30:6.1f} GiB  ({size / ram:.0%} of RAM)")
        print(f"NF4 linears                 {q['bytes'] / 2**30:6.2f} GiB  ({q['bits_per_param']:.3f} bits/param)")
        print(f"whole model after prepare   {result['memory_report']['total']['bytes'] / 2**30:6.2f} GiB")
        whole = result['memory_report']['total']['bytes']
        print(f"load + quantize time        {result['load_s']:6.0f} s")
        print(f"peak anonymous memory       {result['peak_anon'] / 2**30:6.2f} GiB  (after load: "
              f"{result['peak_anon_after_load'] / 2**30:.2f}); {result['peak_anon'] / whole:.2f}x the 4-bit model")
        print(f"peak RSS (incl. mmap cache) {result['peak_rss'] / 2**30:6.2f} GiB  "
              f"({result['peak_rss'] / whole:.2f}x the 4-bit model)")
        if "step_s" in result:
            print(f"one step, 1 x 32 tokens     {result['step_s']:6.1f} s  (loss {result['loss']:.3f})")
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
