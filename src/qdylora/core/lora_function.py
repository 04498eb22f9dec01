"""The adapter's training math as one autograd function, and a cheaper dropout mask.

    delta = (x * mask / keep) @ A_b^T * c @ B_b^T       x (..., in), A_b (b, in), B_b (out, b)

`c` weighs the b components: the scalar s(b) for one rank (every component scaled alike), a
tensor (..., b) broadcast over the rows of x for per-example ranks (row i: s(b_i) on its first b_i
components, 0 on the rest), or a vector (b,) for a training forward that mixes ranks. Written out
with autograd ops, every adapter keeps its own dropped-out copy of x (4 bytes per element) for
A's gradient, although q/k/v (and gate/up) read the same x. `LoRADelta` keeps x itself, shared
by the sibling layers, and the boolean mask (1 byte per element), and recomputes the dropped-out
x in backward (one elementwise pass): a third less activation memory on SmolLM2 (1,120 -> 763
MiB on a batch of 8 x 65 tokens, docs/performance.md). `trained` limits which components get a
gradient (DyLoRA's `frozen` update: only component b-1) without splitting the matrices.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

_BITS = 15  # dropout probabilities are rounded to a multiple of 2^-15

Weights = Union[float, torch.Tensor]


def keep_probability(p: float) -> float:
    """The probability `dropout_mask` keeps an element: 1 - p rounded to a multiple of 2^-15."""
    return 1.0 - round(p * 2**_BITS) / 2**_BITS


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Boolean mask (shape), True with probability `keep_probability(p)`, from the global RNG.

    One 31-bit draw gives two uniform 15-bit numbers: on CPU this is about twice as fast as
    `torch.bernoulli`, whose per-element draws were 10 % of a SmolLM2 training step.
    """
    n = shape.numel()
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_()  # [0, 2^31)
    halves = bits.view(torch.int16)[:n] & (2**_BITS - 1)  # low and high 15 bits, each uniform
    return (halves >= round(p * 2**_BITS)).view(shape)


class LoRADelta(torch.autograd.Function):
    """F.linear(F.linear(x * mask * inv_keep, A) * c, B); gradients for x, A and B.

    c: a float, or a tensor broadcastable to (..., b) in x's dtype. trained: None (every
    component trains) or a bool tensor broadcastable to (..., b): components (per row) whose
    A-row and B-column get a gradient; x's gradient always sees every component.
    """

    @staticmethod
    def forward(ctx, x, A, B, mask, inv_keep: float, c: Weights, trained: Optional[torch.Tensor]):
        # x (..., in), A (b, in), B (out, b), mask (..., in) bool or None; all one dtype.
        # 1/keep is folded into the small matrices: one elementwise pass over x, not two.
        xm = x if mask is None else torch.where(mask, x, 0)  # (..., in), x dropped out, unscaled
        inv_keep = 1.0 if mask is None else inv_keep
        h = torch.nn.functional.linear(xm, A * inv_keep)  # (..., b)
        weighted = torch.is_tensor(c)
        ctx.save_for_backward(x, mask, h, A, B, c if weighted else None, trained)  # x, not xm: siblings share x
        ctx.inv_keep, ctx.s = inv_keep, None if weighted else c
        if weighted:
            return torch.nn.functional.linear(h * c, B)  # (..., out)
        return torch.nn.functional.linear(h, B) * c  # (..., out): one scale, applied where cheaper

    @staticmethod
    def backward(ctx, g):
        x, mask, h, A, B, c, trained = ctx.saved_tensors
        b = A.shape[0]
        # Everything in B's dtype: under an autocast the caller opened around a float32 compute
        # dtype (transformers' Trainer with bf16=True, TRL's default) h and the incoming gradient
        # are bfloat16 while A and B are float32.
        dt = B.dtype
        g2 = g.reshape(-1, g.shape[-1]).to(dt)  # (N, out)
        h2 = h.reshape(-1, b).to(dt)  # (N, b)
        if c is None:
            cw = ctx.s  # scalar
        else:
            cw = c.expand(h.shape).reshape(-1, b)  # (N, b), each row's component weights
        ct = cw if trained is None else cw * trained.expand(h.shape).reshape(-1, b)  # (N, b) or scalar
        gh = g2 @ B  # (N, b): gradient at h * c, before the weights
        grad_B = g2.t() @ (h2 * ct)  # (out, b)
        xm = (x if mask is None else torch.where(mask, x, 0)).to(dt)  # recomputed, (..., in)
        grad_A = (gh * (ct * ctx.inv_keep)).t() @ xm.reshape(-1, xm.shape[-1])  # (b, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = ((gh * cw) @ (A.to(dt) * ctx.inv_keep)).view(x.shape).to(x.dtype)  # (..., in)
            if mask is not None:
                grad_x = torch.where(mask, grad_x, 0)
        return grad_x, grad_A, grad_B, None, None, None, None
