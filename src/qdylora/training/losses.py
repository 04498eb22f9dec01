"""Token losses of a causal LM on labelled batches, for training and validation."""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.rank import evaluating, replicate_for_ranks
from ..data.batching import collate
from ..data.rows import IGNORE, Example


def logits_and_targets(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits (B, P, V) and their targets (B, P), IGNORE where there is no loss.

    Only the P positions whose next token carries a loss in some row are projected onto the
    vocabulary (transformers' `logits_to_keep`): with the prompt masked that is a small part of
    the sequence, and the output head is a large share of a small model's compute.
    """
    labels = batch["labels"]  # (B, T)
    positions = (labels[:, 1:] != IGNORE).any(dim=0).nonzero().squeeze(1)  # (P,), t predicts t+1
    kwargs = {}
    if _accepts_logits_to_keep(model) and positions.numel() < labels.shape[1] - 1:
        kwargs["logits_to_keep"] = positions
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
    if "logits_to_keep" not in kwargs:
        logits, positions = logits[:, :-1], torch.arange(labels.shape[1] - 1, device=labels.device)
    return logits, labels[:, positions + 1]


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    hf = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    hf = getattr(hf, "model", hf)
    return "logits_to_keep" in inspect.signature(hf.forward).parameters


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled tokens, and how many there are.

    Summing (not averaging) lets a step with several micro-batches weigh every token equally.
    """
    sums, counts = row_loss_sums(model, batch)  # (B,), (B,)
    return sums.sum(), int(counts.sum())


def autocast_context(device: torch.device, dtype: torch.dtype, enabled: bool):
    """torch.autocast in `dtype` on `device`, or nothing."""
    if not enabled or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def validation_loss(
    model: nn.Module,
    batches: Sequence[Sequence[Example]],
    ranks: Sequence[int],
    pad_id: int,
    device: torch.device,
    autocast=contextlib.nullcontext,
) -> dict[int, float]:
    """Mean token loss on `batches` at each rank, one rank after another. The model's mode and
    rank are put back afterwards.

    Safe inside training: every Linear4bit is guarded against bitsandbytes' CPU repacking in
    eval mode, which would otherwise stop gradients through the base afterwards.
    """
    with evaluating(model):
        sums = losses_at_ranks(model, batches, ranks, pad_id, device, rank_batch=1, autocast=autocast)
    return {r: s / max(c, 1) for r, (s, c) in sums.items()}


def row_loss_sums(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token loss and per-row count of labelled tokens, each (B,)."""
    logits, targets = logits_and_targets(model, batch)  # (B, P, V), (B, P)
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE,
                         reduction="none")  # (B, P), 0 where ignored
    return ce.sum(dim=1), (targets != IGNORE).sum(dim=1)


@torch.no_grad()
def losses_at_ranks(
    model: nn.Module,
    batches: Sequence[Sequence[Example]],
    ranks: Sequence[int],
    pad_id: int,
    device: torch.device,
    rank_batch: int = 0,
    autocast=contextlib.nullcontext,
    on_batch=None,
) -> dict[int, tuple[float, int]]:
    """{rank: (summed token loss, token count)} on `batches` (see `batch_losses_at_ranks`)."""
    rows = batch_losses_at_ranks(model, padded(batches, pad_id, device), ranks, rank_batch, autocast, on_batch)
    return {r: (float(sums.sum()), int(counts.sum())) for r, (sums, counts) in rows.items()}


def padded(batches: Iterable[Sequence[Example]], pad_id: int,
           device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Each list of examples as padded tensors on `device` (`collate`), one batch at a time."""
    for examples in batches:
        yield {k: v.to(device) for k, v in collate(examples, pad_id).items()}


@torch.no_grad()
def batch_losses_at_ranks(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    ranks: Sequence[int],
    rank_batch: int = 0,
    autocast=contextlib.nullcontext,
    on_batch=None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{rank: (summed token loss of each row, (N,) float64; its labelled tokens, (N,))}, rows in
    the order of `batches`: padded batches (input_ids, attention_mask, labels: (n, T) each, on
    the model's device; labels IGNORE where there is no loss; `padded` makes them from examples).

    Rank-batched: each batch is replicated once per rank (up to `rank_batch` ranks at a time;
    0 = all) and row i of copy j runs at rank ranks[j] (per-example ranks), so the frozen base
    is dequantized once per layer per forward instead of once per rank. With rank_batch=1 the
    ranks run one after another at a shared rank.
    """
    group = rank_batch if rank_batch > 0 else len(ranks)
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {r: [] for r in ranks}
    for batch in batches:
        n = batch["input_ids"].shape[0]
        for start in range(0, len(ranks), group):
            chunk = list(ranks[start:start + group])
            keys = list(batch)
            stacked = dict(zip(keys, replicate_for_ranks(model, chunk, *batch.values())))  # (k*n, T)
            with autocast():
                sums, counts = row_loss_sums(model, stacked)  # (k*n,), (k*n,)
            sums, counts = sums.double().cpu(), counts.cpu()
            for j, r in enumerate(chunk):
                parts[r].append((sums[j * n:(j + 1) * n], counts[j * n:(j + 1) * n]))
            if on_batch is not None:
                on_batch(len(chunk))
    empty = (torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    return {r: (torch.cat([s for s, _ in p]), torch.cat([c for _, c in p])) if p else empty
            for r, p in parts.items()}


def loss_tokens(examples) -> int:
    """Tokens that carry a loss (predicted from a previous token) in a list of examples."""
    return sum(sum(1 for label in e.labels[1:] if label != IGNORE) for e in examples)


def gradient_norm(params) -> torch.Tensor:
    """The global L2 norm of the gradients of `params` (those that have one)."""
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.tensor(0.0)
