"""Calibration statistics: the R x R Gram matrices of each adapter on real rows, which the
data-aware allocation scores and orders read (`core.allocation`, `core.ordering`).

For every adapted layer, with the full adapter (rank R) active, on calibration rows:

    G = mean over tokens of q q^T,   q = A x            (R,): what the adapter computes first
    P = sum over tokens of p p^T,    p = B^T g          (R,): g = d(mean token loss) / d(output)

Both are R x R whatever the layer's width, so a 30B model's statistics are a few MB. G needs a
forward pass only; P a backward pass too (about 3x a forward; `gradients=False` skips it). They
belong to the factors they were taken with: the file keeps the adapter's tensor digest and a
changed adapter is calibrated again.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core.allocation import tail_errors
from ..core.model import QDyLoRAModel
from ..core.rank import evaluating, set_rank
from ..core.scaling import scale
from ..data.rows import IGNORE, Example
from ..errors import QDyLoRAError
from ..files import atomic_write
from .losses import loss_sum, padded


@dataclass
class Statistics:
    """G and P (float64, (R, R)) of each adapted layer, and what they were measured on."""

    G: dict[str, torch.Tensor]
    P: dict[str, torch.Tensor] = field(default_factory=dict)  # empty when taken without gradients
    rows: int = 0
    tokens: int = 0

    @property
    def has_gradients(self) -> bool:
        return bool(self.P)


def calibrate(model: QDyLoRAModel, batches: Sequence[dict[str, torch.Tensor]], *, gradients: bool = True,
              autocast=contextlib.nullcontext, on_batch: Optional[Callable[[], None]] = None) -> Statistics:
    """G (and with `gradients`, P) of every adapted layer on padded `batches` (input_ids,
    attention_mask, labels; `losses.padded` makes them), the full adapter active, eval mode.
    The model's rank, mode and gradients are as before afterwards."""
    layers = model.adapter_layers()
    R = model.qdylora_config.max_rank
    device = next(model.parameters()).device  # sums stay there (no sync per layer), float64
    G = {p: torch.zeros(R, R, dtype=torch.float64, device=device) for p in layers}
    P = {p: torch.zeros(R, R, dtype=torch.float64, device=device) for p in layers} if gradients else {}
    mask: list[torch.Tensor] = []  # the current batch's real (non-padding) tokens, (B * T,)
    labelled = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)

    def accumulate(grams: dict, path: str, v: torch.Tensor) -> None:
        v = v.reshape(-1, R)[mask[0]] if v.numel() // R == mask[0].numel() else v.reshape(-1, R)
        v = v.detach()
        grams[path] += (v.T @ v).to(grams[path])

    def hook(path: str, layer):
        def forward_hook(module, inputs, output):
            x = inputs[0].detach()  # G needs no graph
            accumulate(G, path, x.float() @ layer.lora_A.detach().float().T)  # (..., R)
            if gradients and output.requires_grad:
                output.register_hook(lambda g: accumulate(P, path, g.float() @ layer.lora_B.detach().float()))
        return forward_hook

    handles = [layer.register_forward_hook(hook(path, layer)) for path, layer in layers.items()]
    params = model.adapter_parameters()
    tokens = rows = 0
    try:
        with evaluating(model), torch.set_grad_enabled(gradients):
            set_rank(model, R)
            for batch in batches:
                mask[:] = [batch["attention_mask"].reshape(-1).bool()]
                with autocast():
                    total, _ = loss_sum(model, batch)  # summed token loss of the batch
                if gradients:
                    # the hooks collect P; no .grad is set
                    torch.autograd.grad(total / max(labelled, 1), params, allow_unused=True)
                tokens += int(mask[0].sum())
                rows += batch["input_ids"].shape[0]
                if on_batch is not None:
                    on_batch()
    finally:
        for h in handles:
            h.remove()
    return Statistics({p: (g / max(tokens, 1)).cpu() for p, g in G.items()}, {p: v.cpu() for p, v in P.items()},
                      rows, tokens)


def calibration_batches(examples: Sequence[Example], n: int, seed: int, batch_size: int, pad_id: int,
                        device: torch.device) -> list[dict[str, torch.Tensor]]:
    """`n` examples drawn with `seed` (all when n <= 0 or n >= their number), padded in batches."""
    from ..data.batching import fixed_batches

    # sampling the positions draws as sampling the examples would, without reading them all
    everything = range(len(examples))
    positions = everything if n <= 0 or n >= len(examples) else random.Random(seed).sample(everything, n)
    chosen = [examples[i] for i in positions]
    return list(padded(fixed_batches(chosen, batch_size), pad_id, device))


def layer_grams(model: QDyLoRAModel, score: str,
                stats: Optional[Statistics] = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The R x R pair (M, N) of every adapted layer under `score` (`core.allocation`'s table):
    "svd" needs no statistics, "output" needs G, "loss" G and P. Float64, on the CPU."""
    if score != "svd" and stats is None:
        raise QDyLoRAError(f"the {score!r} score needs calibration statistics")
    if score == "loss" and not stats.has_gradients:
        raise QDyLoRAError("the 'loss' score needs statistics taken with gradients")
    grams = {}
    for path, layer in model.adapter_layers().items():
        A, B = layer.lora_A.detach().double().cpu(), layer.lora_B.detach().double().cpu()  # (R, in), (out, R)
        M = stats.P[path] if score == "loss" else B.T @ B  # (R, R)
        N = A @ A.T if score == "svd" else stats.G[path]  # (R, R)
        grams[path] = (M, N)
    return grams


def layer_errors(model: QDyLoRAModel, score: str, stats: Optional[Statistics] = None) -> dict[str, torch.Tensor]:
    """e_l(b), b = 0..R, of every adapted layer under `score` (`core.allocation.tail_errors`)."""
    layers = model.adapter_layers()
    return {path: tail_errors(M, N, scale(layers[path].alpha, layers[path].max_rank, layers[path].scaling,
                                          layers[path].max_rank, layers[path].rank_gains))
            for path, (M, N) in layer_grams(model, score, stats).items()}


def save_statistics(path: Path, stats: Statistics, adapter_digest: str, request: dict) -> None:
    """The statistics as one safetensors file, tied to the adapter they were taken with and to
    the `request` (JSON-able: how many rows were asked for, ...) that produced them."""
    tensors = {f"G.{p}": g.contiguous() for p, g in stats.G.items()}
    tensors.update({f"P.{p}": v.contiguous() for p, v in stats.P.items()})
    meta = {"rows": str(stats.rows), "tokens": str(stats.tokens), "adapter_sha256": adapter_digest,
            "layers": json.dumps(list(stats.G)), "request": json.dumps(request, sort_keys=True)}
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_statistics(path: Path, adapter_digest: str, request: dict,
                    layers: dict[str, int]) -> Optional[Statistics]:
    """The statistics in `path` if they belong to this adapter and request, else None (absent or
    stale); checked against the adapter's `layers` ({path: max rank}), since the file is only
    tied to the adapter by its metadata."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if (meta.get("adapter_sha256") != adapter_digest
                    or meta.get("request") != json.dumps(request, sort_keys=True)):
                return None
            held = json.loads(meta["layers"])
            G = {p: f.get_tensor(f"G.{p}") for p in held}
            P = {p: f.get_tensor(f"P.{p}") for p in held if f"P.{p}" in f.keys()}
            stats = Statistics(G, P, int(meta["rows"]), int(meta["tokens"]))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise QDyLoRAError(f"calibration file {path} is damaged ({e}): delete it to calibrate again") from None
    problem = statistics_problem(stats, layers)
    if problem:
        raise QDyLoRAError(f"calibration file {path} is damaged ({problem}): delete it to calibrate again")
    return stats


def statistics_problem(stats: Statistics, layers: dict[str, int]) -> Optional[str]:
    """What is wrong with statistics read back for an adapter of `layers` ({path: max rank}):
    other layers, a matrix not (R, R), a value that is not finite, a negative diagonal (G and P
    are Gram matrices: sums of squares there), or P for only some layers; None when nothing is."""
    if set(stats.G) != set(layers):
        return f"its layers are not the adapter's ({len(stats.G)} against {len(layers)})"
    if stats.P and set(stats.P) != set(layers):
        return "it has gradient statistics for only some layers"
    for kind, table in (("G", stats.G), ("P", stats.P)):
        for p, m in table.items():
            if tuple(m.shape) != (layers[p], layers[p]):
                return f"{kind} of {p} is {tuple(m.shape)}, not {(layers[p], layers[p])}"
            if not torch.isfinite(m).all():
                return f"{kind} of {p} holds values that are not finite"
            if (torch.diagonal(m) < 0).any():
                return f"{kind} of {p} has a negative diagonal"
    if stats.rows < 1 or stats.tokens < 1:
        return f"it was measured on {stats.rows} rows and {stats.tokens} tokens"
    return None
