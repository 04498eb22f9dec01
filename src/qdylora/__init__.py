"""qdylora: QLoRA-style 4-bit NF4 fine-tuning with dynamic-rank LoRA adapters (QDyLoRA).

    import qdylora
    model = qdylora.prepare("path/or/hub-id", qdylora.QDyLoRAConfig(max_rank=64, alpha=16))
    qdylora.set_rank(model, 8)
    with qdylora.at_rank(model, 2):
        ...
"""

from .config import QDyLoRAConfig
from .errors import QDyLoRAError
from .layer import QDyLoRALinear
from .loading import load_tokenizer, resolve_source
from .memory import MemoryReport, memory_report
from .model import QDyLoRAModel, prepare
from .rank import adapter_layers, at_rank, get_rank, set_rank, set_update_mode

__version__ = "0.1.0"

__all__ = [
    "QDyLoRAConfig",
    "QDyLoRAError",
    "QDyLoRALinear",
    "QDyLoRAModel",
    "MemoryReport",
    "adapter_layers",
    "at_rank",
    "get_rank",
    "load_tokenizer",
    "memory_report",
    "prepare",
    "resolve_source",
    "set_rank",
    "set_update_mode",
]
