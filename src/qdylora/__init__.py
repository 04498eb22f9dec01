"""qdylora: QLoRA-style 4-bit NF4 fine-tuning with dynamic-rank LoRA adapters (QDyLoRA).

    import qdylora
    model = qdylora.prepare("path/or/hub-id", qdylora.QDyLoRAConfig(max_rank=64, alpha=16))
    qdylora.set_rank(model, 8)
    with qdylora.at_rank(model, 2):
        ...
"""

from ._version import __version__

from .core.config import QDyLoRAConfig
from .core.layer import QDyLoRALinear
from .core.loading import load_tokenizer, resolve_source
from .core.memory import MemoryReport, memory_report
from .core.model import QDyLoRAModel, prepare
from .core.ordering import order_by_svd
from .core.rank import adapter_layers, at_rank, get_rank, set_rank, set_update_mode
from .data.rows import read_rows
from .errors import QDyLoRAError
from .evaluation.generation import answer, generate_at_ranks
from .evaluation.sweep import SweepResult, run_sweep, sweep_run
from .export.merge import merge
from .export.peft import export_peft
from .training.adapter_file import base_fingerprint, load_adapter, read_adapter_metadata, save_adapter
from .training.rundir import load_run
from .training.sampling import RankSampler
from .training.settings import DataSettings, RunSettings, TrainSettings
from .training.trainer import train

__all__ = [
    "__version__",
    "DataSettings",
    "RunSettings",
    "SweepResult",
    "TrainSettings",
    "answer",
    "export_peft",
    "generate_at_ranks",
    "merge",
    "load_run",
    "run_sweep",
    "sweep_run",
    "order_by_svd",
    "read_rows",
    "train",
    "QDyLoRAConfig",
    "QDyLoRAError",
    "QDyLoRALinear",
    "RankSampler",
    "QDyLoRAModel",
    "MemoryReport",
    "adapter_layers",
    "at_rank",
    "base_fingerprint",
    "get_rank",
    "load_adapter",
    "load_tokenizer",
    "memory_report",
    "prepare",
    "read_adapter_metadata",
    "resolve_source",
    "save_adapter",
    "set_rank",
    "set_update_mode",
]
