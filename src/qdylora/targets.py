"""Which layers of a causal LM get an adapter, and which get quantized."""

from __future__ import annotations

from typing import Union

import bitsandbytes as bnb
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import QDyLoRAError

# Layers we know how to quantize and wrap: nn.Linear and its subclasses (Falcon's FalconLinear),
# GPT-2's Conv1D (weight stored transposed) and layers bitsandbytes already quantized.
LINEAR_TYPES = (nn.Linear, Conv1D, bnb.nn.Linear4bit)


def output_head_names(model: nn.Module) -> set[str]:
    """Module paths of the output head (lm_head), which is never quantized nor adapted."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of the transformer blocks: all linears except the output head."""
    heads = output_head_names(model)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LINEAR_TYPES) and name not in heads
    }


def find_targets(model: nn.Module, target_modules: Union[str, list[str]]) -> dict[str, nn.Module]:
    """Module path -> layer for every layer that gets an adapter.

    "all-linear" selects `block_linears`. A list of names selects the block linears whose path
    ends with one of them (component-wise, as PEFT matches: "q_proj" matches
    "model.layers.0.self_attn.q_proj" but not "model.layers.0.self_attn.xq_proj").
    """
    linears = block_linears(model)
    if not linears:
        raise QDyLoRAError(
            f"{type(model).__name__} has no linear layers qdylora can adapt "
            "(nn.Linear, GPT-2 Conv1D): this architecture is not supported"
        )
    if target_modules == "all-linear":
        return linears
    wanted = list(target_modules)
    chosen = {name: m for name, m in linears.items() if any(_ends_with(name, t) for t in wanted)}
    missing = [t for t in wanted if not any(_ends_with(name, t) for name in linears)]
    if missing:
        raise QDyLoRAError(
            f"target_modules {missing} match no linear layer; linear layers here are named: "
            f"{', '.join(sorted({name.rsplit('.', 1)[-1] for name in linears}))}"
        )
    other = [
        name for name, m in model.named_modules()
        if any(_ends_with(name, t) for t in wanted) and name not in linears
    ]
    if other:
        raise QDyLoRAError(
            f"target_modules select {other[0]} ({type(dict(model.named_modules())[other[0]]).__name__}), "
            "which is not a linear layer of the transformer blocks; name linear layers only"
        )
    return chosen


def _ends_with(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)
