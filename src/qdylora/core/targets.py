"""Which layers of a causal LM get an adapter, and which get quantized."""

from __future__ import annotations

from typing import Union

import bitsandbytes as bnb
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import QDyLoRAError
from .gguf_linear import GGUFLinear

# Layers we know how to quantize and wrap: nn.Linear and its subclasses (Falcon's FalconLinear),
# GPT-2's Conv1D (weight stored transposed), layers bitsandbytes already quantized, and frozen
# layers in a GGUF's blocks.
LINEAR_TYPES = (nn.Linear, Conv1D, bnb.nn.Linear4bit, GGUFLinear)
# Architectures whose linears are Conv1D in transformers (after `prepare` they are NF4 layers,
# so the type is how a prepared model still says so).
CONV1D_MODEL_TYPES = {"gpt2", "gpt_bigcode", "imagegpt", "decision_transformer"}


def uses_conv1d(model: nn.Module) -> bool:
    """True for GPT-2-style models (transformers' `Conv1D` linears, weight stored (in, out)),
    before or after `prepare` replaced them: PEFT then wants fan_in_fan_out=True, and a merged
    model must hold Conv1D layers again."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return model_type in CONV1D_MODEL_TYPES or any(isinstance(m, Conv1D) for m in model.modules())


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at the dotted `path` of `root`."""
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


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
    names = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linears}))
    modules = dict(model.named_modules())
    chosen: dict[str, nn.Module] = {}
    for target in target_modules:
        matches = [name for name in modules if _ends_with(name, target)]
        if not matches:
            raise QDyLoRAError(
                f"target module {target!r} matches no layer; linear layers here are named: {names}"
            )
        for name in matches:
            if name not in linears:
                raise QDyLoRAError(
                    f"target module {target!r} selects {name} ({type(modules[name]).__name__}), which "
                    f"is not a linear layer of the transformer blocks; linear layers here are named: {names}"
                )
            chosen[name] = linears[name]
    return chosen


def _ends_with(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer (Conv1D stores its weight (in, out))."""
    if isinstance(layer, Conv1D):
        return tuple(layer.weight.shape)
    return layer.in_features, layer.out_features


def check_max_rank(targets: dict[str, nn.Module], max_rank: int) -> None:
    """Refuse a max rank above min(in, out) of a targeted layer: rank(B A) cannot exceed it, so
    such components only cost memory (a 64-wide model at max_rank 100000 wrote an 819 MB adapter)."""
    if not targets:
        return
    name = min(targets, key=lambda n: min(layer_features(targets[n])))
    n_in, n_out = layer_features(targets[name])
    if max_rank > min(n_in, n_out):
        raise QDyLoRAError(
            f"max_rank {max_rank} is above the narrowest targeted layer ({name}: {n_in} -> {n_out}), "
            f"whose adapter cannot use more than {min(n_in, n_out)} components: use --max-rank "
            f"{min(n_in, n_out)} or less, or leave that layer out of target_modules")
