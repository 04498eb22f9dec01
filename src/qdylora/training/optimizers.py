"""The optimizer of A and B: torch's AdamW, or bitsandbytes' 8-bit and paged AdamW (the QLoRA
paper trains with paged optimizers on GPUs).

bitsandbytes' 8-bit AdamW keeps both moments as uint8 codes with one float32 absmax per block of
256 values (blockwise dynamic quantization), about a quarter of AdamW's 8 bytes per parameter;
tensors under 4,096 values keep 32-bit state, as bitsandbytes decides. Paged optimizers put their
state in CUDA unified memory, paged to the CPU under memory pressure: there is nothing to page on
a CPU, so there the non-paged optimizer is used, with a warning.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..console import log
from ..errors import QDyLoRAError

OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit")


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZERS) over `params`, AdamW's betas (0.9, 0.999) and eps 1e-8."""
    if name not in OPTIMIZERS:
        raise QDyLoRAError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name.startswith("paged-") and device.type != "cuda":
        log.warning(f"--optim {name}: paged optimizer state lives in CUDA unified memory; on {device.type} "
                    f"the non-paged {name.removeprefix('paged-')} is used")
        name = name.removeprefix("paged-")
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {"adamw-8bit": bnb.optim.AdamW8bit, "paged-adamw": bnb.optim.PagedAdamW,
           "paged-adamw-8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, quantization codes, absmax)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))
