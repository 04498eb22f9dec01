"""Optimizer-state memory of each `--optim` for the rank-64 adapters of SmolLM2-135M and of a
13B-shaped Llama (Llama-2 13B dimensions, all linears targeted).

The adapter tensors (A: R x in, B: out x R, float32) are made at their real shapes from the
model's config (the base is built on the meta device: no weights are read or allocated); one
optimizer step on random gradients fills the state, whose tensors are then counted.

    .venv/bin/python benchmarks/optimizer_memory.py [--max-rank 64]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from qdylora.core.targets import find_targets
from qdylora.data.embedded import smollm2_checkpoint
from qdylora.training.optimizers import OPTIMIZERS, make_optimizer, state_bytes

LLAMA_13B = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000)


def adapter_shapes(config, max_rank: int) -> list[tuple[int, int]]:
    """(rows, cols) of every A and B of an all-linear adapter at `max_rank`."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = []
    for layer in find_targets(model, "all-linear").values():
        shapes += [(max_rank, layer.in_features), (layer.out_features, max_rank)]
    return shapes


def measure(shapes: list[tuple[int, int]], name: str) -> tuple[int, float]:
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    optimizer = make_optimizer(name, params, lr=2e-4, weight_decay=0.0, device=torch.device("cpu"))
    for p in params:
        p.grad = torch.randn_like(p)
    start = time.perf_counter()
    optimizer.step()
    seconds = time.perf_counter() - start
    used = state_bytes(optimizer)
    del optimizer, params
    gc.collect()
    return used, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-rank", type=int, default=64)
    args = ap.parse_args()
    models = {"SmolLM2-135M": AutoConfig.from_pretrained(smollm2_checkpoint()), "13B-shaped Llama": LLAMA_13B}
    print(f"| model | adapter params (rank {args.max_rank}) | optimizer | state | bytes / param | one step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model_name, config in models.items():
        shapes = adapter_shapes(config, args.max_rank)
        n = sum(r * c for r, c in shapes)
        for name in OPTIMIZERS:
            if name.startswith("paged-") and not torch.cuda.is_available():
                continue  # the same as the non-paged one on a CPU
            used, seconds = measure(shapes, name)
            print(f"| {model_name} | {n / 1e6:.1f} M | {name} | {used / 2**20:,.1f} MiB | "
                  f"{used / n:.2f} | {seconds:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
