"""`QDyLoRALinear`: a trainable dynamic-rank LoRA pair beside a frozen NF4 linear layer.

At active rank b (0 <= b <= R, 0 = adapter off):

    y = W~ x + s(b) * B[:, :b] @ A[:b, :] @ dropout(x)

with W~ the dequantized NF4 weight (out x in), A (R x in), B (out x R), s(b) = alpha / b,
alpha / sqrt(b), or alpha / sqrt(R) at every b ("nested"; `scaling.py`). The rank is an int for
the whole batch (one rank per training step), a tensor of shape [batch] so one batch mixes
ranks (training with per-example ranks, the rank sweep, side-by-side generation), or a
`RankMixture`: the adapter averaged over a distribution of ranks (a deterministic training
forward).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..errors import QDyLoRAError
from .lora_function import LoRADelta, Weights, dropout_mask, keep_probability
from .scaling import RankMixture, scale, scales

Rank = Union[int, torch.Tensor, RankMixture]


class QDyLoRALinear(nn.Module):
    """Frozen base (`bnb.nn.Linear4bit` in NF4, or `GGUFLinear` in a GGUF's blocks) plus A (R x in)
    and B (out x R) in float32."""

    def __init__(
        self,
        base: nn.Module,
        max_rank: int,
        alpha: float,
        scaling: str = "standard",
        dropout: float = 0.0,
        update_mode: str = "full",
        compute_dtype: torch.dtype = torch.bfloat16,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.max_rank, self.alpha, self.scaling = max_rank, alpha, scaling
        self.rank_gains: tuple[float, ...] | None = None  # g(1..R) multiplying s(b) (`core.gains`)
        self.update_mode = update_mode
        self.compute_dtype = compute_dtype
        self.dropout = dropout  # probability, applied to the adapter's input in training
        # LoRA's init: A Kaiming-uniform (as nn.Linear), B zero, so the adapter starts as a no-op.
        # Drawn on the CPU so a seeded CPU generator gives the same A on every device.
        A = torch.empty(max_rank, self.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        device = next(iter(base.state_dict().values())).device  # the NF4 weight, or the GGUF blocks
        self.lora_A = nn.Parameter(A.to(device))  # (R, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, max_rank, device=device))  # (out, R)
        self.rank: Rank = max_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out), NF4 dequantize + matmul in compute_dtype; grad flows to x
        if isinstance(self.rank, int) and self.rank == 0:
            return y
        x = x.to(self.compute_dtype)  # (..., in); A and B follow its dtype
        p = self.dropout if self.training else 0.0
        mask = dropout_mask(x.shape, p, x.device) if p > 0 else None  # (..., in) bool
        b, c, trained = self._components(x)
        A, B = self.lora_A[:b].to(x.dtype), self.lora_B[:, :b].to(x.dtype)  # fp32 masters, cast after slicing
        delta = LoRADelta.apply(x, A, B, mask, 1.0 / keep_probability(p), c, trained)
        return y + delta.to(y.dtype)

    def _components(self, x: torch.Tensor) -> tuple[int, Weights, Optional[torch.Tensor]]:
        """How many components run (b), their weights c (a scalar or broadcastable to
        (..., b)) and which of them get a gradient (None: all), for the active rank."""
        rank, frozen = self.rank, self.update_mode == "frozen"
        if isinstance(rank, int):
            trained = torch.arange(rank, device=x.device) == rank - 1 if frozen else None  # (b,)
            return rank, scale(self.alpha, rank, self.scaling, self.max_rank, self.rank_gains), trained
        if isinstance(rank, RankMixture):
            if frozen:
                raise QDyLoRAError("a rank mixture trains every component: use update mode 'full'")
            weights = rank.component_weights(self.alpha, self.scaling, self.max_rank)
            return rank.max_rank, weights.to(x.device, x.dtype), None
        # Per-example ranks: all R components run; row i weighs its first b_i by s(b_i), the rest 0.
        ranks = _per_row(rank.to(x.device), x)  # (rows,)
        view = (x.shape[0],) + (1,) * (x.dim() - 2) + (self.max_rank,)  # broadcasts over tokens
        components = torch.arange(self.max_rank, device=x.device)  # (R,)
        on = components[None, :] < ranks[:, None]  # (rows, R)
        s = scales(self.alpha, ranks, self.scaling, self.max_rank, self.rank_gains)  # (rows,)
        c = (s[:, None] * on).to(x.dtype).view(view)
        trained = (components[None, :] == ranks[:, None] - 1).view(view) if frozen else None
        return self.max_rank, c, trained

    def factors(self, b: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The adapter at rank b as factors: A[:b] (b, in), B[:, :b] (out, b), detached views of the
        float32 masters, and s(b) (its gain included), so that its delta is s(b) B[:, :b] A[:b].
        The one home of that product for every exporter (merge, PEFT, GGUF); PEFT's
        `get_delta_weight` is B A * scaling with scaling = lora_alpha / r."""
        s = scale(self.alpha, b, self.scaling, self.max_rank, self.rank_gains)
        return self.lora_A.detach()[:b], self.lora_B.detach()[:, :b], s

    def delta_weight(self, b: int) -> torch.Tensor:
        """(out, in) float32: s(b) B[:, :b] A[:b], what merging rank b adds to the base weight."""
        A, B, s = self.factors(b)
        return s * (B.float() @ A.float())

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, max_rank={self.max_rank}, "
            f"alpha={self.alpha}, scaling={self.scaling}{', rank gains' if self.rank_gains else ''}, "
            f"dropout={self.dropout}, "
            f"update_mode={self.update_mode}"
        )


def _per_row(ranks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-example ranks (batch,) matched to the rows of x: some blocks (OPT's MLP) flatten
    (batch, seq, in) to (batch * seq, in), batch-major, so each rank repeats over its tokens."""
    if x.dim() == 2 and x.shape[0] != ranks.shape[0] and x.shape[0] % ranks.shape[0] == 0:
        ranks = ranks.repeat_interleave(x.shape[0] // ranks.shape[0])
    if x.shape[0] != ranks.shape[0]:
        raise ValueError(
            f"per-example ranks have {ranks.shape[0]} entries but the batch has {x.shape[0]} rows"
        )
    return ranks
