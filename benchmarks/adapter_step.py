"""One adapter's forward + backward: autograd ops (F.dropout, two F.linear) against LoRADelta.

    .venv/bin/python benchmarks/adapter_step.py [--tokens 1040] [--rank 64] [--repeats 15]

The shapes of a SmolLM2 q_proj adapter on a batch of 8 x 130 tokens, dropout 0.05, float32.
Interleaves the two ways (and both without dropout) and prints median milliseconds per
forward + backward and the bytes each keeps for backward when three adapters read one input
(q, k and v), counted with saved-tensor hooks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from qdylora.core.lora_function import LoRADelta, dropout_mask

P = 0.05


def autograd_way(x, A, B, p):
    xd = F.dropout(x, p, training=True) if p > 0 else x
    return F.linear(F.linear(xd, A), B) * 2.0


def lora_delta_way(x, A, B, p):
    mask = dropout_mask(x.shape, p, x.device) if p > 0 else None
    return LoRADelta.apply(x, A, B, mask, 1 / (1 - p), 2.0, None)


def saved_bytes(way, x, A, B) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [way(x, A, B, P) for _ in range(3)]  # q, k, v read the same x
    del outs
    return sum(storages.values()) - A.numel() * 4 - B.numel() * 4  # parameters are not extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1040)
    ap.add_argument("--features", type=int, default=576)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    n, d, b = args.tokens, args.features, args.rank
    x = torch.randn(n, d, requires_grad=True)
    A = torch.randn(b, d, requires_grad=True)
    B = torch.randn(d, b, requires_grad=True)
    g = torch.randn(n, d)
    ways = {"autograd, dropout": (autograd_way, P), "LoRADelta, dropout": (lora_delta_way, P),
            "autograd, no dropout": (autograd_way, 0.0), "LoRADelta, no dropout": (lora_delta_way, 0.0)}
    times = {k: [] for k in ways}
    for _ in range(args.repeats):
        for k, (way, p) in ways.items():
            start = time.perf_counter()
            for _ in range(5):
                way(x, A, B, p).backward(g)
            times[k].append((time.perf_counter() - start) / 5 * 1e3)
    print(f"{n} tokens x {d} features, rank {b}, {torch.get_num_threads()} threads, float32")
    for k in ways:
        print(f"  {k:24s} {statistics.median(times[k]):7.2f} ms forward + backward")
    for k, way in (("autograd", autograd_way), ("LoRADelta", lora_delta_way)):
        print(f"  kept for backward by q/k/v adapters ({k}): {saved_bytes(way, x, A, B) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
