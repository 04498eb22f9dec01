"""Bytes each stack keeps for backward on one SmolLM2 training batch (saved-tensor hooks).

    .venv/bin/python benchmarks/activation_memory.py [--batch-size 8] [--only qdylora-r64,reference-grouped]

Counts every distinct storage autograd saves during one forward pass (the batch of the training
benchmark, ASDiv, rank 64, dropout 0.05, float32), minus the model's own parameters (which
autograd also references), and lists the largest shapes. Deterministic: no timing involved.
Run it with PYTHONPATH pointing at another checkout's src/ to measure that version.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_speed as ts  # noqa: E402


def saved_bytes(name: str, batch_size: int) -> tuple[int, int, list]:
    from transformers import AutoTokenizer

    from qdylora.core.rank import set_rank
    from qdylora.data.batching import collate, pad_token_id
    from qdylora.data.embedded import smollm2_checkpoint
    from qdylora.training.losses import loss_sum

    path = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    stack, quantized, grouped = ts.COMPETITORS[name]
    batch = collate(ts._batches(ts._examples(tok, 3 * batch_size), batch_size, True)[0], pad_token_id(tok))
    model = (ts._peft_model(path, quantized, torch.float32) if stack == "peft"
             else ts._qdylora_model(path, quantized, "float32"))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    storages: dict[int, int] = {}
    shapes: collections.Counter = collections.Counter()

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in storages and key not in params:
            storages[key] = t.untyped_storage().nbytes()
            shapes[(tuple(t.shape), str(t.dtype).removeprefix("torch."))] += t.untyped_storage().nbytes()
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if stack == "qdylora":
            set_rank(model, ts.RANK)
            total, n = loss_sum(model, batch)
        else:
            loss = model(**batch).loss  # noqa: F841
    return sum(storages.values()), batch["input_ids"].numel(), shapes.most_common(6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--only", default="reference-grouped,qdylora-r64")
    args = ap.parse_args()
    for name in args.only.split(","):
        total, tokens, top = saved_bytes(name, args.batch_size)
        print(f"{name}: {total / 2**20:.0f} MiB kept for backward, {tokens} token positions "
              f"({total / tokens / 1024:.0f} KiB per position)")
        for (shape, dtype), size in top:
            print(f"    {str(shape):24s} {dtype:9s} {size / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
