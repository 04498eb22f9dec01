"""`prepare`: a Hugging Face causal LM -> `QDyLoRAModel` (NF4 base + dynamic-rank adapters)."""

from __future__ import annotations

import inspect
import os
import types
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import bitsandbytes as bnb
import torch
from torch import nn

from ..errors import QDyLoRAError
from .config import QDyLoRAConfig
from .devices import resolve_device
from .gguf_base import converted_from, gguf_linears
from .layer import QDyLoRALinear
from .loading import ModelSource, load_causal_lm, release_freed_heap, resolve_source
from .quantize import QUANT_TYPE, guard_cpu_repacking, quantize_linear
from .rank import adapter_layers
from .targets import block_linears, check_max_rank, find_targets, replace_module


class QDyLoRAModel(nn.Module):
    """A causal LM whose targeted linears are `QDyLoRALinear` layers.

    It passes for the transformers model it wraps, as PEFT's wrapper does: `forward`, `generate`
    and every attribute it does not have itself (`config`, `get_input_embeddings`,
    `gradient_checkpointing_enable`, `device`, `dtype`, `generation_config`, ...) are the wrapped
    model's. Our settings are `qdylora_config`. The active rank is chosen with
    `qdylora.set_rank` / `qdylora.at_rank`. Only the adapters' A and B require grad.
    """

    # transformers' flag for "trainable adapters are attached to this quantized model": its
    # Trainer refuses to fine-tune a 4-bit model without it (or a PEFT model)
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, config: QDyLoRAConfig, base_model_name_or_path: str) -> None:
        super().__init__()
        self.model = model
        self.qdylora_config = config
        self.base_model_name_or_path = base_model_name_or_path

        self.forward = types.MethodType(_forwarding(model), self)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (nn.Module's own lookup)
        except AttributeError:
            if name == "model":  # not set up yet (during __init__, or when unpickling)
                raise
            return getattr(self.model, name)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        """The wrapped model's forward. Each instance replaces this by a function with the wrapped
        model's exact signature (see __init__); this one names `labels` for code that inspects
        the class (transformers' `find_labels`: without it a Trainer computes no eval loss)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def save_pretrained(self, out: Union[str, os.PathLike], **kwargs) -> None:
        """Write a run directory `qdylora sweep / export / merge / generate` read (config.json and
        adapter.safetensors: `qdylora.save_run`, which takes the same keywords). For a PEFT
        adapter of one rank, `qdylora export DIR --rank b` (or `qdylora.export_peft`)."""
        from ..training.hf_trainer import save_run  # training builds on core: imported when called

        save_run(self, out, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counting each packed 4-bit byte as two
        parameters, as PEFT counts a bitsandbytes model."""
        trainable = total = 0
        for p in self.parameters():
            n = p.numel() * (2 if isinstance(p, bnb.nn.Params4bit) else 1)
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the trainable share the way PEFT users know it (at max_rank: every rank below
        trains a prefix of these)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def adapter_layers(self) -> dict[str, QDyLoRALinear]:
        """Module path (inside the wrapped model) -> adapter layer."""
        return adapter_layers(self.model)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters: every A and B, in model order."""
        return [p for layer in self.adapter_layers().values() for p in (layer.lora_A, layer.lora_B)]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """{"<path>.lora_A": (R, in), "<path>.lora_B": (out, R)} at full max_rank, detached."""
        out = {}
        for name, layer in self.adapter_layers().items():
            out[f"{name}.lora_A"] = layer.lora_A.detach()
            out[f"{name}.lora_B"] = layer.lora_B.detach()
        return out

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy A and B in from `adapter_state_dict()`'s format; every key must match exactly."""
        expected = self.adapter_state_dict()
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise QDyLoRAError(
                f"adapter does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise QDyLoRAError(
                    f"adapter tensor {key} has shape {tuple(value.shape)}, "
                    f"this model needs {tuple(expected[key].shape)}"
                )
        with torch.no_grad():
            for name, layer in self.adapter_layers().items():
                layer.lora_A.copy_(state[f"{name}.lora_A"])
                layer.lora_B.copy_(state[f"{name}.lora_B"])


def _forwarding(model: nn.Module):
    """A forward for a `QDyLoRAModel` with `model.forward`'s exact signature (transformers'
    Trainer reads it to keep the dataset's columns), bound per instance; copy.deepcopy rebinds
    it to the copy."""
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    params = list(inspect.signature(model.forward).parameters.values())
    forward.__signature__ = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *params])
    return forward


def prepare(
    model: Union[str, os.PathLike, nn.Module],
    config: Optional[QDyLoRAConfig] = None,
    *,
    device: Union[str, torch.device, None] = None,
    gguf_file: Optional[str] = None,
    trust_remote_code: bool = False,
) -> QDyLoRAModel:
    """Turn a causal LM into a QDyLoRA model.

    `model` is a loaded transformers model, a local directory (safetensors), a .gguf file or a
    hub id. Every linear layer of the transformer blocks is stored frozen in NF4 with double
    quantization (QLoRA's convention, also for layers without an adapter); the targeted ones
    get a trainable A, B pair. Embeddings, norms and the output head stay unquantized and frozen
    (in `config.frozen_dtype` when loaded from a path).
    `device` applies when loading from a path (default: CUDA if available, else CPU); a loaded
    model stays where it is.
    """
    config = config or QDyLoRAConfig()
    if isinstance(model, nn.Module):
        if adapter_layers(model) or isinstance(model, QDyLoRAModel):
            raise QDyLoRAError("this model is already prepared with QDyLoRA adapters")
        config, gguf_path = _base_format(config.resolved_for(next(model.parameters()).device), None)
        hf, name = model, getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    else:
        src = resolve_source(str(model), gguf_file)
        target_device = resolve_device(device)
        config, gguf_path = _base_format(config.resolved_for(target_device), src)
        hf = load_causal_lm(src, config.torch_compute_dtype, target_device, trust_remote_code,
                            frozen_dtype=config.torch_frozen_dtype)
        name = str(model)
    dtype = config.torch_compute_dtype

    targets = find_targets(hf, config.target_modules)  # validates before any change
    check_max_rank(targets, config.max_rank)
    linears = block_linears(hf)
    if gguf_path is not None:  # the file's own blocks
        frozen = gguf_linears(hf, linears, gguf_path, dtype)
    else:
        frozen = {path: _as_nf4(path, layer, dtype) for path, layer in linears.items()}
    for path, layer in frozen.items():
        replace_module(hf, path, layer)
    del linears, frozen
    for p in hf.parameters():
        p.requires_grad_(False)

    generator = torch.Generator().manual_seed(config.seed)
    for path, layer in block_linears(hf).items():  # model order, so A draws are reproducible
        if path in targets:
            adapter = QDyLoRALinear(
                layer,
                max_rank=config.max_rank,
                alpha=config.alpha,
                scaling=config.scaling,
                dropout=config.dropout,
                update_mode=config.update_mode,
                compute_dtype=dtype,
                generator=generator,
            )
            replace_module(hf, path, adapter)
    release_freed_heap()  # the loading's temporaries
    return QDyLoRAModel(hf, config, name)


def _base_format(config: QDyLoRAConfig, src: Optional[ModelSource]) -> tuple[QDyLoRAConfig, Optional[Path]]:
    """The config with its base format resolved ("auto": gguf for a .gguf model, else nf4), and
    the GGUF file whose blocks are the base (None: NF4)."""
    gguf_path = None
    if src is not None and src.is_local:
        gguf_path = Path(src.path) / src.gguf_file if src.gguf_file else converted_from(Path(src.path))
    fmt = config.base_format
    if fmt == "auto":
        fmt = "gguf" if src is not None and src.gguf_file else "nf4"
    if fmt == "gguf" and gguf_path is None:
        raise QDyLoRAError("--base-format gguf keeps the frozen base in the model's GGUF blocks, and this model "
                           "comes from no GGUF file: pass --model FILE.gguf, or --base-format nf4")
    return replace(config, base_format=fmt), gguf_path if fmt == "gguf" else None


def _as_nf4(path: str, layer: nn.Module, compute_dtype: torch.dtype) -> bnb.nn.Linear4bit:
    """The layer stored in NF4 (quantized here unless bitsandbytes already did it)."""
    if isinstance(layer, bnb.nn.Linear4bit):
        state = layer.weight.quant_state
        if state is None or state.quant_type != QUANT_TYPE or not state.nested:
            raise QDyLoRAError(
                f"{path} is 4-bit but not NF4 with double quantization: load the model in full "
                "precision and let qdylora quantize it"
            )
        layer.compute_dtype = compute_dtype
        layer.compute_type_is_set = True
        guard_cpu_repacking(layer)
        return layer
    if not layer.weight.is_floating_point() or isinstance(layer, bnb.nn.Linear8bitLt):
        raise QDyLoRAError(
            f"{path} is a {type(layer).__name__} with {layer.weight.dtype} weights: load the model "
            "in full precision and let qdylora quantize it"
        )
    return quantize_linear(layer, compute_dtype)
