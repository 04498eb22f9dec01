"""`QDyLoRAConfig`: how a causal LM is turned into a QDyLoRA model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import torch

from ..errors import QDyLoRAError
from .devices import fast_compute_dtype
from .fields import AT_LEAST_ONE, FRACTION, POSITIVE, SEED, check_fields, checked

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # the short names users type


def dtype_name(name: str) -> str:
    """The long dtype name of "bf16", "fp16", "fp32" (others unchanged)."""
    return DTYPE_ALIASES.get(name, name)


@dataclass
class QDyLoRAConfig:
    """Adapter and quantization settings, fixed when the model is prepared."""

    max_rank: Annotated[int, AT_LEAST_ONE] = 64
    """Largest LoRA rank R. A is (R x in_features), B is (out_features x R); every rank 1..R is usable."""

    alpha: Annotated[float, POSITIVE] = 16.0
    """LoRA alpha. The adapter at rank b is scaled by alpha / b (or alpha / sqrt(b) with rslora)."""

    scaling: Literal["standard", "rslora", "nested"] = "standard"
    """Scale rule s(b): "standard" is alpha / b (the default: LoRA's and PEFT's, so the default run at rank R trains exactly as a PEFT QLoRA run of rank R, and its best learning rate hardly depends on R; docs/rank-study.md found the larger alpha / sqrt(R) at rank 64 behind QLoRA on Qwen2.5-0.5B), "rslora" is alpha / sqrt(b) (rsLoRA: 8x the step of B at rank 64), "nested" is alpha / sqrt(max_rank) at every rank (rank b is the first b components of the full adapter, unscaled)."""

    dropout: Annotated[float, FRACTION] = 0.05
    """Dropout on the adapter's input (the frozen base path sees the undropped input)."""

    target_modules: Union[str, list[str]] = "all-linear"
    """Linear layers that get an adapter: "all-linear" (every linear in the transformer blocks, not the output head) or module names matched as the last components of the path, e.g. ["q_proj", "v_proj"] or ["self_attn.q_proj"]."""

    update_mode: Literal["full", "frozen"] = "full"
    """"full": every entry of A[:b], B[:, :b] is trained (QDyLoRA). "frozen": only row b-1 of A and column b-1 of B are trained, the earlier ones are used but detached (DyLoRA's rule)."""

    compute_dtype: Literal["auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32"] = "auto"
    """Dtype of the matrix products (NF4 base and adapter) and of the unquantized weights when the model is loaded from a path. "auto": bfloat16 where the device multiplies it fast (GPUs with bf16, CPUs with AVX512-BF16 or AMX), else float32. Adapter parameters are always stored in float32."""

    frozen_dtype: Literal["auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32"] = "auto"
    """Dtype in which the frozen weights that stay unquantized (embeddings, norms, output head) are stored when the model is loaded from a path. "auto": the compute dtype. "bfloat16" halves them where the compute dtype is float32 (a CPU without fast bf16): the NF4 and adapter products still run in float32, the hidden states between them are bfloat16, as in QLoRA on a GPU."""

    base_format: Literal["auto", "nf4", "gguf"] = "auto"
    """How the frozen linear layers are stored: nf4 (QLoRA's NF4 with double quantization, by bitsandbytes), gguf (the model's GGUF file's own blocks, Q4_K, Q6_K, Q4_1, ... kept as the file has them and dequantized as llama.cpp does: the base you serve; for a .gguf model, or a checkpoint converted from one such as the embedded SmolLM2); auto: gguf when --model is a .gguf file (or a directory holding one), else nf4."""

    seed: Annotated[int, SEED] = 0
    """Seed for the adapter initialisation (A is Kaiming-uniform, B is zero) and, when training, for the validation split, data order, rank sampling and dropout."""

    def __post_init__(self) -> None:
        check_fields(self)  # types, choices, finiteness and bounds (core/fields.py)
        self.compute_dtype = dtype_name(self.compute_dtype)
        if self.compute_dtype != "auto" and self.compute_dtype not in DTYPES:
            raise QDyLoRAError(
                f"compute_dtype must be auto or one of {', '.join(DTYPES)}, got {self.compute_dtype!r}"
            )
        self.frozen_dtype = dtype_name(self.frozen_dtype)
        if self.frozen_dtype != "auto" and self.frozen_dtype not in DTYPES:
            raise QDyLoRAError(
                f"frozen_dtype must be auto or one of {', '.join(DTYPES)}, got {self.frozen_dtype!r}"
            )
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            # A single module name is accepted as a one-element list, as PEFT users write it.
            self.target_modules = [self.target_modules]
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise QDyLoRAError("target_modules is empty: use 'all-linear' or name the modules")

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        """The compute dtype; "auto" must be resolved first (`resolved_for`)."""
        if self.compute_dtype == "auto":
            raise QDyLoRAError("compute_dtype 'auto' is resolved when the model is prepared")
        return DTYPES[self.compute_dtype]

    @property
    def torch_frozen_dtype(self) -> torch.dtype:
        """The storage dtype of the unquantized frozen weights ("auto": the compute dtype)."""
        return self.torch_compute_dtype if self.frozen_dtype == "auto" else DTYPES[self.frozen_dtype]

    def resolved_for(self, device: Union[str, torch.device]) -> "QDyLoRAConfig":
        """A copy whose compute_dtype "auto" is replaced by the fast dtype of `device`."""
        if self.compute_dtype != "auto":
            return self
        name = {v: k for k, v in DTYPES.items()}[fast_compute_dtype(device)]
        return dataclasses.replace(self, compute_dtype=name)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict, where: str = "QDyLoRAConfig") -> "QDyLoRAConfig":
        return from_dict(cls, d, where)


def from_dict(cls, values: dict, where: str):
    """Build the dataclass `cls` from a dict (a config file, a saved run, an adapter file's
    metadata): unknown keys and every value's type and bounds are checked first, each error one
    line naming `where` and the field."""
    return cls(**checked(cls, values, where))
