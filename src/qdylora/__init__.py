"""qdylora: QLoRA-style 4-bit NF4 fine-tuning with dynamic-rank LoRA adapters (QDyLoRA).

    import qdylora
    model = qdylora.prepare("path/or/hub-id", qdylora.QDyLoRAConfig(max_rank=64, alpha=16))
    qdylora.set_rank(model, 8)
    with qdylora.at_rank(model, 2):
        ...
"""

__version__ = "0.1.0"

from .adapter_file import base_fingerprint, load_adapter, read_adapter_metadata, save_adapter
from .config import QDyLoRAConfig
from .errors import QDyLoRAError
from .layer import QDyLoRALinear
from .loading import load_tokenizer, resolve_source
from .memory import MemoryReport, memory_report
from .model import QDyLoRAModel, prepare
from .rank import adapter_layers, at_rank, get_rank, set_rank, set_update_mode
from .export import export_peft
from .generation import answer, generate_at_ranks
from .merge import merge
from .sampling import RankSampler
from .settings import DataSettings, RunSettings, TrainSettings
from .sweep import SweepResult, load_run, run_sweep
from .trainer import train

__all__ = [
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
