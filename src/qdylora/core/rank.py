"""Choosing the active rank of every adapter in a model: one rank, or one per example."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence, Union

import torch
from torch import nn

from ..errors import QDyLoRAError
from .allocation import Allocation
from .layer import QDyLoRALinear, Rank
from .scaling import RankMixture

RankLike = Union[int, Sequence[int], torch.Tensor, RankMixture, Allocation]


def adapter_layers(model: nn.Module) -> dict[str, QDyLoRALinear]:
    """Module path -> adapter layer, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QDyLoRALinear)}


def _named_layers(model: nn.Module) -> dict[str, QDyLoRALinear]:
    """Adapter layers under the paths an `Allocation` uses: inside the wrapped transformers model
    for a QDyLoRAModel (its `adapter_layers`), else inside `model`."""
    own = getattr(model, "adapter_layers", None)
    return own() if callable(own) else adapter_layers(model)


def max_rank(model: nn.Module) -> int:
    layers = list(adapter_layers(model).values())
    if not layers:
        raise QDyLoRAError("this model has no QDyLoRA adapters: call qdylora.prepare on it first")
    return layers[0].max_rank


def _validate(model: nn.Module, rank: RankLike) -> Rank:
    top = max_rank(model)
    if isinstance(rank, bool):
        raise QDyLoRAError(f"rank must be an integer, got {rank!r}")
    if isinstance(rank, int):
        if not 0 <= rank <= top:
            raise QDyLoRAError(f"rank {rank} is out of range: use 1..{top} (or 0 for the base model)")
        return rank
    if isinstance(rank, Allocation):
        ranks, layers = rank.as_dict(), _named_layers(model)
        if set(ranks) != set(layers):
            raise QDyLoRAError(f"the allocation {rank} names other layers than this model's {len(layers)} adapters")
        bad = [r for r in ranks.values() if not 0 <= r <= top]
        if bad:
            raise QDyLoRAError(f"rank {bad[0]} is out of range: use 1..{top} (or 0 for the base model)")
        return rank
    if isinstance(rank, RankMixture):
        if not rank.probabilities or rank.probabilities[0][0] < 1 or rank.max_rank > top:
            raise QDyLoRAError(f"a rank mixture needs ranks in 1..{top}, got {rank.probabilities}")
        return rank
    ranks = torch.as_tensor(rank)
    if ranks.dim() != 1 or ranks.is_floating_point() or ranks.is_complex():
        raise QDyLoRAError("per-example ranks must be a 1-D integer tensor of shape [batch]")
    bad = ranks[(ranks < 0) | (ranks > top)]
    if bad.numel():
        raise QDyLoRAError(f"rank {int(bad[0])} is out of range: use 1..{top} (or 0 for the base model)")
    return ranks.to(torch.long)


def set_rank(model: nn.Module, rank: RankLike) -> None:
    """Set the active rank of every adapter.

    `rank` is an int in 0..max_rank for the whole batch (0 = adapter off, the base model), a
    sequence / tensor of shape [batch] giving each example its own rank, or a `RankMixture`
    (the adapter averaged over a distribution of ranks, for training), or an `Allocation` (each
    layer its own rank).
    """
    value = _validate(model, rank)
    for path, layer in _named_layers(model).items():
        layer.rank = value.rank_of(path) if isinstance(value, Allocation) else value


def get_rank(model: nn.Module) -> Rank:
    """The active rank (int or per-example tensor) of the first adapter."""
    layers = list(adapter_layers(model).values())
    if not layers:
        raise QDyLoRAError("this model has no QDyLoRA adapters: call qdylora.prepare on it first")
    return layers[0].rank


@contextmanager
def _ranks_kept(model: nn.Module) -> Iterator[None]:
    """Every adapter's rank as it was before the block (layers may differ: an allocation)."""
    previous = {layer: layer.rank for layer in adapter_layers(model).values()}
    try:
        yield
    finally:
        for layer, rank in previous.items():
            layer.rank = rank


@contextmanager
def at_rank(model: nn.Module, rank: RankLike) -> Iterator[None]:
    """`with at_rank(model, 8): ...` runs the block at rank 8 and restores the previous rank."""
    with _ranks_kept(model):
        set_rank(model, rank)
        yield


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The block runs in eval mode; the model's training mode and rank are put back after it
    (an evaluation inside training, or a sweep on a model someone else holds)."""
    was_training = model.training
    model.eval()
    try:
        with _ranks_kept(model):
            yield
    finally:
        model.train(was_training)


def set_update_mode(model: nn.Module, mode: str) -> None:
    """"full" (QDyLoRA: all of A[:b], B[:, :b] train) or "frozen" (DyLoRA: only component b-1)."""
    if mode not in ("full", "frozen"):
        raise QDyLoRAError(f"update mode must be 'full' or 'frozen', got {mode!r}")
    for layer in adapter_layers(model).values():
        layer.update_mode = mode


def replicate_for_ranks(model: nn.Module, ranks: Sequence[Union[int, Allocation]],
                        *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Prepare `model` to run every rank in `ranks` (ints or allocations) over the (n, ...)
    tensors of one batch.

    One rank: the model runs at that shared rank and the tensors come back as they are. Several:
    the tensors are repeated rank-major, (k * n, ...), and rows j*n..(j+1)*n-1 run at ranks[j]
    (per-example ranks; under an allocation each layer gets its own ranks per row), so all ranks
    share each forward pass.
    """
    ranks = list(ranks)
    if len(ranks) == 1:
        set_rank(model, ranks[0])
        return batch
    for r in ranks:
        _validate(model, r)
    n, device = batch[0].shape[0], batch[0].device
    made: dict[tuple[int, ...], torch.Tensor] = {}  # layers with the same ranks share one tensor
    for path, layer in _named_layers(model).items():
        per_rank = tuple(r.rank_of(path) if isinstance(r, Allocation) else r for r in ranks)
        if per_rank not in made:
            made[per_rank] = torch.tensor(per_rank, device=device).repeat_interleave(n)  # (k * n,)
        layer.rank = made[per_rank]
    return tuple(t.repeat(len(ranks), *([1] * (t.dim() - 1))) for t in batch)
