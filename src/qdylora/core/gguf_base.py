"""A model's frozen linear layers taken from its GGUF file's own blocks (`--base-format gguf`,
issue 40), and the names that tie a transformers model to llama.cpp's tensors (used here and by
the GGUF export).

transformers reads a GGUF by dequantizing every tensor; `gguf_linears` then replaces each linear
layer of the transformer blocks by a `GGUFLinear` holding that layer's tensor as the file stores
it (Q4_K, Q6_K, Q4_1, ...), its rows put back in transformers' order where llama.cpp's converter
permuted them (q and k of the llama architecture). A row of GGUF blocks is one row of the weight,
so that permutation moves whole rows of bytes: the blocks stay bit for bit the file's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..errors import QDyLoRAError
from . import gguf_quants
from .gguf_linear import GGUFLinear

# transformers' model_type -> llama.cpp architecture (convert_hf_to_gguf registers MistralForCausalLM as llama)
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
ROPE_PERMUTED = {"LLAMA"}  # convert_hf_to_gguf: LlamaModel.undo_permute
GGUF_SOURCE = "gguf_source.json"  # in a checkpoint converted from a GGUF: {"gguf": the file it came from}


def gguf_architecture(model: nn.Module, what: str = "GGUF export",
                      instead: str = "the PEFT export (--format peft)"):
    """llama.cpp's architecture (a `gguf.MODEL_ARCH`) of a transformers model; one line naming
    the supported ones, `what` needs them and what to use `instead`."""
    import gguf

    model_type = getattr(model.config, "model_type", "?")
    if model_type not in ARCHITECTURES:
        raise QDyLoRAError(f"{what} supports {', '.join(sorted(ARCHITECTURES))} models, not {model_type}: "
                           f"use {instead} for this model")
    return getattr(gguf.MODEL_ARCH, ARCHITECTURES[model_type])


def gguf_name(tensor_map, hf_name: str) -> Optional[str]:
    """The GGUF name of a transformers tensor or module path ("model.layers.0.self_attn.q_proj" ->
    "blk.0.attn_q"), None when llama.cpp has none (`tensor_map`: a `gguf.TensorNameMap`)."""
    return tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def rope_permute(rows: torch.Tensor, hf_name: str, config) -> torch.Tensor:
    """`rows` (out, ...) of a q or k projection in llama.cpp's order for the llama architecture:
    convert_hf_to_gguf's LlamaModel.permute, heads (n, 2, d/2) -> (n, d/2, 2); other tensors, and
    every tensor of architectures llama.cpp does not permute, as they are."""
    leaf = hf_name.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]
    if leaf not in ("q_proj", "k_proj") or ARCHITECTURES.get(config.model_type) not in ROPE_PERMUTED:
        return rows
    heads = config.num_attention_heads if leaf == "q_proj" else (config.num_key_value_heads
                                                                 or config.num_attention_heads)
    return (rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def converted_from(checkpoint: Path) -> Optional[Path]:
    """The GGUF file a checkpoint directory was converted from (its GGUF_SOURCE note), if any."""
    note = checkpoint / GGUF_SOURCE
    if not note.is_file():
        return None
    try:
        path = Path(json.loads(note.read_text())["gguf"])
    except (ValueError, KeyError, TypeError):  # a damaged note: as if the source were unknown
        return None
    return path if path.is_file() else None


def gguf_linears(hf: nn.Module, linears: dict[str, nn.Module], path: Path,
                 compute_dtype: torch.dtype) -> dict[str, GGUFLinear]:
    """For each of `linears` (path -> the loaded layer of `hf`), a GGUFLinear of the GGUF file
    `path`'s tensor for it, on that layer's device (bias as loaded: llama.cpp keeps biases in
    float32). One line when the file lacks a tensor, holds another shape or a block type not
    supported here."""
    import gguf

    arch = gguf_architecture(hf, "a GGUF base (--base-format gguf)", "--base-format nf4")
    names = gguf.get_tensor_name_map(arch, hf.config.num_hidden_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    out = {}
    for hf_path, layer in linears.items():
        name = gguf_name(names, hf_path)
        t = tensors.get(f"{name}.weight") if name else None
        if t is None:
            raise QDyLoRAError(f"{path} has no tensor for {hf_path}: it is not this model's GGUF; "
                               "pass the model's own .gguf, or --base-format nf4")
        qtype = int(t.tensor_type)
        cols, rows = (int(x) for x in t.shape)  # gguf lists the fastest dimension first
        if (rows, cols) != (layer.out_features, layer.in_features):
            raise QDyLoRAError(f"{path}: {t.name} is {rows} x {cols}, the model's {hf_path} "
                               f"{layer.out_features} x {layer.in_features}: not this model's GGUF")
        if not gguf_quants.supported(qtype):
            raise QDyLoRAError(f"{path}: {t.name} is in {gguf.GGMLQuantizationType(qtype).name}, which "
                               f"--base-format gguf does not read ({', '.join(gguf_quants.NAMES.values())} "
                               "it does): use --base-format nf4")
        # (out, row_bytes) uint8, in llama.cpp's row order
        raw = torch.from_numpy(np.asarray(t.data).view(np.uint8).reshape(rows, -1).copy())
        order = rope_permute(torch.arange(rows), hf_path, hf.config)  # position i holds transformers' row order[i]
        hf_raw = torch.empty_like(raw)
        hf_raw[order] = raw
        device = next(layer.parameters()).device
        out[hf_path] = GGUFLinear(hf_raw.to(device), qtype, cols, getattr(layer, "bias", None), compute_dtype)
    return out
