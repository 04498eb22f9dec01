"""Merge one rank (or an allocation of per-layer ranks) of the adapter into the dequantized base
and save a plain model directory.

W_merged = dequantize(NF4 W) + s(b) * B[:, :b] A[:b]  for every adapted layer (b: the rank, or
that layer's rank in the allocation); the other NF4
layers are dequantized as they are. Layers are replaced one at a time, so peak memory stays near
the size of the merged model plus the 4-bit one, not twice the merged size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import bitsandbytes as bnb
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.allocation import Allocation, layer_rank
from ..core.config import DTYPES, dtype_name
from ..core.gguf_linear import GGUFLinear
from ..core.layer import QDyLoRALinear
from ..core.loading import forget_quantizer
from ..core.model import QDyLoRAModel
from ..core.quantize import dequantized_weight
from ..core.targets import replace_module, uses_conv1d
from ..errors import QDyLoRAError
from ..files import atomic_dir, refuse_existing
from ..training.sampling import check_ranks
from ..training.settings import RunSettings
from .opening import open_run

if TYPE_CHECKING:
    from ..evaluation.budgets import AllocationRequest

REQUANTIZE_NOTE = (
    "note: the merged weights are the dequantized NF4 base plus the adapter; quantizing this "
    "model to 4 bits again adds a second rounding error, so prefer the adapter on the NF4 base "
    "when you serve in 4 bits"
)


def merge(model: QDyLoRAModel, rank: Union[int, Allocation], out: Union[str, Path], *, tokenizer=None,
          dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Write a Hugging Face model directory (safetensors, config, generation config, tokenizer)
    whose weights are the base merged with the adapter at `rank` (an int, or an `Allocation`:
    each layer at its own rank). `model` is consumed: its layers are replaced by plain ones as
    they are merged."""
    c = model.qdylora_config
    check_ranks([rank] if isinstance(rank, int) else [b for _, b in rank.ranks], c.max_rank,
                lowest=1 if isinstance(rank, int) else 0)
    dtype = dtype_name(dtype)
    if dtype not in DTYPES:
        raise QDyLoRAError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    refuse_existing(out, overwrite, ours=is_model_file)
    hf = merge_layers(model, rank, DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def merge_layers(model: QDyLoRAModel, rank: Union[int, Allocation], dtype: torch.dtype) -> nn.Module:
    """The transformers model of `model` with every adapted layer merged at `rank` (the other NF4
    layers dequantized) into plain layers of `dtype`, one layer at a time; returns it."""
    hf = model.model
    conv1d = uses_conv1d(hf)
    with torch.no_grad():
        for path, module in list(hf.named_modules()):
            if isinstance(module, QDyLoRALinear):
                base = module.base
                W = dequantized_weight(base)  # (out, in) float32
                W += module.delta_weight(layer_rank(rank, path))
            elif isinstance(module, (bnb.nn.Linear4bit, GGUFLinear)) and not path.endswith(".base"):
                base, W = module, dequantized_weight(module)
            else:
                continue
            replace_module(hf, path, _plain_linear(W, base.bias, dtype, conv1d))
    forget_quantizer(hf)
    return hf.to(dtype)


def _plain_linear(W: torch.Tensor, bias, dtype: torch.dtype, conv1d: bool) -> nn.Module:
    """nn.Linear holding W (out, in), or GPT-2's Conv1D holding W.T (in, out)."""
    out_features, in_features = W.shape
    if conv1d:
        layer = Conv1D(out_features, in_features)
        layer.weight = nn.Parameter(W.t().contiguous().to(dtype), requires_grad=False)
        layer.bias = nn.Parameter((bias.detach() if bias is not None else torch.zeros(out_features)).to(dtype),
                                  requires_grad=False)
        return layer.to(W.device)
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(W.to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return layer


def is_model_file(name: str) -> bool:
    """A file `save_pretrained` of a model or tokenizer writes (what --overwrite may replace)."""
    return bool(re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|tokenizer[\w.]*|"
                             r"(generation_)?config\.json|special_tokens_map\.json|chat_template\.jinja|"
                             r"added_tokens\.json|vocab\.json|merges\.txt", name))


def merge_run(run_dir: Union[str, Path], rank: Optional[int], out: Union[str, Path], *, dtype: str = "bfloat16",
              overwrite: bool = False, device: Optional[str] = None, trust_remote_code: bool = False,
              allocation: Optional[AllocationRequest] = None, progress: bool = False) -> Path:
    """`merge` of a training run's adapter at `rank`, or under `allocation` (its per-layer ranks);
    rank and --out are checked before loading."""

    def check_outputs(settings: RunSettings) -> None:
        base = Path(settings.model or "")  # a local base model directory or file (the embedded one lives in a cache)
        if settings.model and base.exists() and (base.resolve() == Path(out).resolve()
                                                  or Path(out).resolve() in base.resolve().parents):
            raise QDyLoRAError(f"--out {out} holds the run's base model ({base}): merging there would replace it; "
                               "choose another --out")
        refuse_existing(out, overwrite, ours=is_model_file)

    run = open_run(run_dir, [] if allocation else [rank], allocation, check_outputs, device=device,
                   trust_remote_code=trust_remote_code, progress=progress)
    return merge(run.model, run.entries[0], out, tokenizer=run.tokenizer, dtype=dtype, overwrite=overwrite)
