"""Token losses of a causal LM on labelled batches, for training and validation."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batching import collate
from .data import IGNORE, Example
from .rank import at_rank


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled tokens, and how many there are.

    Summing (not averaging) lets a step with several micro-batches weigh every token equally.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    targets = batch["labels"][:, 1:]  # (B, T-1)
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )
    return total, int((targets != IGNORE).sum())


def autocast_context(device: torch.device, dtype: torch.dtype, enabled: bool):
    """torch.autocast in `dtype` on `device`, or nothing."""
    if not enabled or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    batches: Sequence[Sequence[Example]],
    ranks: Sequence[int],
    pad_id: int,
    device: torch.device,
    autocast=contextlib.nullcontext,
) -> dict[int, float]:
    """Mean token loss on `batches` at each rank. The model is put back in its mode afterwards.

    Safe inside training: every Linear4bit is guarded against bitsandbytes' CPU repacking in
    eval mode, which would otherwise stop gradients through the base afterwards.
    """
    was_training = model.training
    model.eval()
    out = {}
    try:
        for rank in ranks:
            total, count = 0.0, 0
            with at_rank(model, rank):
                for examples in batches:
                    batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
                    with autocast():
                        s, n = loss_sum(model, batch)
                    total, count = total + float(s), count + n
            out[rank] = total / max(count, 1)
    finally:
        model.train(was_training)
    return out
