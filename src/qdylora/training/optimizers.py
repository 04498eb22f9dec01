"""The optimizer of A and B: torch's AdamW, or bitsandbytes' 8-bit and paged AdamW (the QLoRA
paper trains with paged optimizers on GPUs).

bitsandbytes' 8-bit AdamW keeps both moments as uint8 codes with one float32 absmax per block of
256 values (blockwise dynamic quantization), about a quarter of AdamW's 8 bytes per parameter;
tensors under 4,096 values keep 32-bit state, as bitsandbytes decides. Paged optimizers put their
state in CUDA unified memory, paged to the CPU under memory pressure: there is nothing to page on
a CPU, so there the non-paged optimizer is used, with a warning.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..console import log
from ..errors import QDyLoRAError

OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit")


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                   device: torch.device, in_backward: bool = False) -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZERS) over `params`, AdamW's betas (0.9, 0.999) and eps 1e-8;
    with `in_backward`, one per parameter stepped during backward (`InBackwardOptimizer`)."""
    if name not in OPTIMIZERS:
        raise QDyLoRAError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name.startswith("paged-") and device.type != "cuda":
        log.warning(f"--optim {name}: paged optimizer state lives in CUDA unified memory; on {device.type} "
                    f"the non-paged {name.removeprefix('paged-')} is used")
        name = name.removeprefix("paged-")
    def build(group: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if name == "adamw":
            return torch.optim.AdamW(group, lr=lr, weight_decay=weight_decay)
        import bitsandbytes as bnb

        cls = {"adamw-8bit": bnb.optim.AdamW8bit, "paged-adamw": bnb.optim.PagedAdamW,
               "paged-adamw-8bit": bnb.optim.PagedAdamW8bit}[name]
        return cls(group, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    return InBackwardOptimizer(build, params, lr) if in_backward else build(list(params))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, quantization codes, absmax)."""
    if isinstance(optimizer, InBackwardOptimizer):
        return sum(state_bytes(o) for o in optimizer.inner)
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))


class InBackwardOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by a hook the moment backward has completed that
    parameter's gradient, which is then freed (PyTorch's "optimizer step in backward" recipe,
    torchtune's optimizer_in_bwd). The gradients of all adapters are never held at once: on a
    30B-shaped Llama at rank 64 that is 1.8 GiB (docs/performance.md, "Scale").

    To the trainer and the LR scheduler it is one optimizer: its param_groups (one per parameter)
    carry the learning rate, copied into the inner optimizer before each update; `step` and
    `zero_grad` have nothing left to do. `grad_norm()` is the global norm of the gradients the
    last backward applied; a non-finite gradient is not applied (the norm is then non-finite too).
    """

    def __init__(self, build: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
                 params: Iterable[torch.nn.Parameter], lr: float) -> None:
        params = list(params)
        super().__init__([{"params": [p]} for p in params], {"lr": lr})
        self.inner = [build([p]) for p in params]
        self._sq_norm: list[torch.Tensor] = []
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params)]

    def _hook(self, index: int):
        def update(p: torch.Tensor) -> None:
            sq = p.grad.detach().float().pow(2).sum()  # ()
            self._sq_norm.append(sq)
            if bool(torch.isfinite(sq)):  # a NaN or inf is not applied (the trainer then stops)
                inner = self.inner[index]
                inner.param_groups[0]["lr"] = self.param_groups[index]["lr"]
                inner.step()
            p.grad = None
        return update

    def grad_norm(self) -> float:
        """The global gradient norm of the last backward (then reset for the next step)."""
        total = float(torch.stack(self._sq_norm).sum().sqrt()) if self._sq_norm else 0.0
        self._sq_norm = []
        return total

    @torch.no_grad()
    def step(self, closure=None):  # the updates already happened in backward
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # the hooks freed every gradient
        return None

    def state_dict(self) -> dict:
        return {"groups": super().state_dict(), "inner": [o.state_dict() for o in self.inner]}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"groups", "inner"} or len(state_dict["inner"]) != len(self.inner):
            raise QDyLoRAError("this optimizer state is not that of --optimizer-in-backward for this model")
        super().load_state_dict(state_dict["groups"])
        for o, s in zip(self.inner, state_dict["inner"]):
            o.load_state_dict(s)

    def remove_hooks(self) -> None:
        """Detach from the parameters (the model may be trained or used again afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
