"""`QDyLoRALinear`: a trainable dynamic-rank LoRA pair beside a frozen NF4 linear layer.

At active rank b (0 <= b <= R, 0 = adapter off):

    y = W~ x + s(b) * B[:, :b] @ A[:b, :] @ dropout(x)

with W~ the dequantized NF4 weight (out x in), A (R x in), B (out x R), s(b) = alpha / b or
alpha / sqrt(b). The rank is an int for the whole batch (training: one rank per step) or a
tensor of shape [batch] so one batch mixes ranks (rank sweep, side-by-side generation).
"""

from __future__ import annotations

import math
from typing import Union

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import nn

from .config import scale
from .lora_function import LoRADelta, dropout_mask, keep_probability

Rank = Union[int, torch.Tensor]


class QDyLoRALinear(nn.Module):
    """Frozen `bnb.nn.Linear4bit` base plus A (R x in) and B (out x R) in float32."""

    def __init__(
        self,
        base: bnb.nn.Linear4bit,
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
        self.update_mode = update_mode
        self.compute_dtype = compute_dtype
        self.dropout = dropout  # probability, applied to the adapter's input in training
        # LoRA's init: A Kaiming-uniform (as nn.Linear), B zero, so the adapter starts as a no-op.
        # Drawn on the CPU so a seeded CPU generator gives the same A on every device.
        A = torch.empty(max_rank, self.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        device = base.weight.device
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
        inv_keep = 1.0 / keep_probability(p)
        A, B = self.lora_A, self.lora_B  # (R, in), (out, R): fp32 masters, cast after slicing
        if isinstance(self.rank, int):
            b = self.rank
            first_trained = b - 1 if self.update_mode == "frozen" else 0
            delta = LoRADelta.apply(x, A[:b].to(x.dtype), B[:, :b].to(x.dtype), mask, inv_keep,
                                    self._scale(b), first_trained)
        else:
            xd = x if mask is None else x * mask * inv_keep
            delta = _delta_per_example(xd, A, B, self.rank, self._scales(self.rank), self.update_mode)
        return y + delta.to(y.dtype)

    def _scale(self, rank: int) -> float:
        return scale(self.alpha, rank, self.scaling)

    def _scales(self, ranks: torch.Tensor) -> torch.Tensor:
        """s(b) for each example, shape [batch]; 0 where the rank is 0."""
        r = ranks.to(torch.float32)
        s = self.alpha / (r if self.scaling == "standard" else r.sqrt())
        return torch.where(ranks > 0, s, torch.zeros_like(s))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, max_rank={self.max_rank}, "
            f"alpha={self.alpha}, scaling={self.scaling}, dropout={self.dropout}, "
            f"update_mode={self.update_mode}"
        )


def _delta_per_example(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, ranks: torch.Tensor, s: torch.Tensor, mode: str
) -> torch.Tensor:
    """Per-example ranks: example i uses the first ranks[i] components, scaled by s[i].

    Computes all R components and zeroes those at or past each example's rank, which gives the
    same result as truncating A and B example by example.
    """
    A, B = A.to(x.dtype), B.to(x.dtype)
    ranks, s = ranks.to(x.device), s.to(x.device)
    if x.dim() == 2 and x.shape[0] != ranks.shape[0] and x.shape[0] % ranks.shape[0] == 0:
        # Some blocks (OPT's MLP) flatten (batch, seq, in) to (batch * seq, in), batch-major.
        ranks = ranks.repeat_interleave(x.shape[0] // ranks.shape[0])
        s = s.repeat_interleave(x.shape[0] // s.shape[0])
    if x.shape[0] != ranks.shape[0]:
        raise ValueError(
            f"per-example ranks have {ranks.shape[0]} entries but the batch has {x.shape[0]} rows"
        )
    components = torch.arange(A.shape[0], device=x.device)  # (R,)
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)  # (batch, 1.., R) broadcasts over tokens
    keep = (components[None, :] < ranks[:, None]).to(x.dtype).view(view)  # 1 for components < b_i
    if mode == "full":
        out = F.linear(F.linear(x, A) * keep, B)  # (..., R) -> (..., out)
    else:
        # frozen: components < b_i - 1 are detached; only component b_i - 1 gets a gradient.
        last = (components[None, :] == ranks[:, None] - 1).to(x.dtype).view(view)
        out = F.linear(F.linear(x, A.detach()) * (keep - last), B.detach())
        out = out + F.linear(F.linear(x, A) * last, B)
    return out * s.view(view)  # s_i per example, float32
