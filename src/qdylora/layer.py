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
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
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
        xd = self.dropout(x).to(self.compute_dtype)  # (..., in); A and B follow its dtype
        A, B = self.lora_A, self.lora_B  # (R, in), (out, R): fp32 masters, cast after slicing
        if isinstance(self.rank, int):
            delta = _delta_shared_rank(xd, A, B, self.rank, self._scale(self.rank), self.update_mode)
        else:
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
            f"alpha={self.alpha}, scaling={self.scaling}, update_mode={self.update_mode}"
        )


def _delta_shared_rank(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, b: int, s: float, mode: str
) -> torch.Tensor:
    """s * B[:, :b] A[:b] x for one rank b, computing only the first b components."""
    A_b, B_b = A[:b].to(x.dtype), B[:, :b].to(x.dtype)  # (b, in), (out, b)
    if mode == "frozen":
        # DyLoRA: components before b are used but get no gradient; only component b-1 trains.
        A_b = torch.cat([A_b[:-1].detach(), A_b[-1:]], dim=0)
        B_b = torch.cat([B_b[:, :-1].detach(), B_b[:, -1:]], dim=1)
    return F.linear(F.linear(x, A_b), B_b) * s  # (..., b) -> (..., out)


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
