"""qdylora: QLoRA-style 4-bit NF4 fine-tuning with dynamic-rank LoRA adapters (QDyLoRA).

    import qdylora
    model = qdylora.prepare("path/or/hub-id", qdylora.QDyLoRAConfig(max_rank=64, alpha=16))
    qdylora.set_rank(model, 8)
    with qdylora.at_rank(model, 2):
        ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

# The public API, imported on first use (PEP 562): `import qdylora.cli` stays light, so the
# command line sets up its console before torch, transformers and bitsandbytes load.
_EXPORTS = {
    "Allocation": "core.allocation",
    "QDyLoRAConfig": "core.config",
    "QDyLoRALinear": "core.layer",
    "load_tokenizer": "core.loading",
    "resolve_source": "core.loading",
    "MemoryReport": "core.memory",
    "memory_report": "core.memory",
    "QDyLoRAModel": "core.model",
    "prepare": "core.model",
    "order_by_svd": "core.ordering",
    "adapter_layers": "core.rank",
    "at_rank": "core.rank",
    "get_rank": "core.rank",
    "set_rank": "core.rank",
    "set_update_mode": "core.rank",
    "read_rows": "data.rows",
    "QDyLoRAError": "errors",
    "answer": "evaluation.generation",
    "generate_at_ranks": "evaluation.generation",
    "AllocationRequest": "evaluation.budgets",
    "allocate_run": "evaluation.budgets",
    "SweepResult": "evaluation.sweep",
    "run_sweep": "evaluation.sweep",
    "sweep_run": "evaluation.sweep",
    "SweepSettings": "evaluation.settings",
    "merge": "export.merge",
    "export_peft": "export.peft",
    "export_gguf_adapter": "export.gguf",
    "merge_gguf": "export.gguf",
    "base_fingerprint": "training.adapter_file",
    "load_adapter": "training.adapter_file",
    "read_adapter_metadata": "training.adapter_file",
    "save_adapter": "training.adapter_file",
    "load_run": "training.rundir",
    "RankSampler": "training.sampling",
    "DataSettings": "data.settings",
    "RunSettings": "training.settings",
    "TrainSettings": "training.settings",
    "train": "training.trainer",
    "QDyLoRACallback": "training.hf_trainer",
    "save_run": "training.hf_trainer",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'qdylora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly  # noqa: F401
    from .core.allocation import Allocation
    from .core.config import QDyLoRAConfig
    from .core.layer import QDyLoRALinear
    from .core.loading import load_tokenizer, resolve_source
    from .core.memory import MemoryReport, memory_report
    from .core.model import QDyLoRAModel, prepare
    from .core.ordering import order_by_svd
    from .core.rank import adapter_layers, at_rank, get_rank, set_rank, set_update_mode
    from .data.rows import read_rows
    from .errors import QDyLoRAError
    from .evaluation.budgets import AllocationRequest, allocate_run
    from .evaluation.generation import answer, generate_at_ranks
    from .evaluation.settings import SweepSettings
    from .evaluation.sweep import SweepResult, run_sweep, sweep_run
    from .export.merge import merge
    from .export.peft import export_peft
    from .export.gguf import export_gguf_adapter, merge_gguf
    from .training.adapter_file import base_fingerprint, load_adapter, read_adapter_metadata, save_adapter
    from .training.rundir import load_run
    from .training.sampling import RankSampler
    from .data.settings import DataSettings
    from .training.settings import RunSettings, TrainSettings
    from .training.trainer import train
    from .training.hf_trainer import QDyLoRACallback, save_run
