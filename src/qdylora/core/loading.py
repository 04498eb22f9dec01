"""Loading a causal LM with its linear layers in NF4: local directory, hub id or GGUF file.

From safetensors the weights are quantized while they load (transformers' BitsAndBytesConfig
path, shard by shard), so the full-precision model is never in memory at once. A GGUF file is
dequantized by transformers and then quantized to NF4 layer by layer.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from ..errors import QDyLoRAError
from .quantize import QUANT_TYPE


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `path` (a local directory or a hub id) and an optional GGUF file."""

    path: str
    gguf_file: Optional[str] = None
    is_local: bool = True


def resolve_source(source: str, gguf_file: Optional[str] = None) -> ModelSource:
    """Turn what a user typed into a `ModelSource`, with a clear error for a bad local path.

    A path to a .gguf file, or a directory without config.json holding exactly one .gguf file,
    selects that GGUF file.
    """
    path = Path(os.path.expanduser(str(source)))
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise QDyLoRAError(f"GGUF file {gguf_file!r} not found in {path}")
            return ModelSource(str(path), gguf_file)
        if (path / "config.json").is_file():
            return ModelSource(str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0])
        if ggufs:
            raise QDyLoRAError(
                f"{path} holds several GGUF files ({', '.join(ggufs)}): pass the file's path instead"
            )
        raise QDyLoRAError(
            f"{path} is not a model directory (no config.json and no .gguf file): "
            "point --model at a Hugging Face model directory, a .gguf file or a hub id"
        )
    if path.exists():
        raise QDyLoRAError(f"{path} is not a model directory or a .gguf file")
    looks_local = str(source).startswith((".", "/", "~")) or str(source).count("/") > 1
    if ":" in str(source) and not str(source).startswith((".", "/", "~")):
        return ollama_source(str(source))  # hub ids have no ":"; Ollama names have a tag, or are ollama:NAME
    if looks_local:
        raise QDyLoRAError(f"model path {source} does not exist")
    return ModelSource(str(source), gguf_file, is_local=False)


OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"


def ollama_store() -> Path:
    """Where Ollama keeps its models: $OLLAMA_MODELS, else ~/.ollama/models."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def ollama_source(name: str) -> ModelSource:
    """The GGUF blob of an Ollama model ("qwen2.5:0.5b", "user/model:tag", "ollama:smollm2") in
    the local Ollama store: its manifest (manifests/HOST/NAMESPACE/MODEL/TAG) names the blob
    (blobs/sha256-...) of its model layer. One line when the store or the model is missing."""
    ref = name.removeprefix("ollama:")
    model, _, tag = ref.partition(":")
    parts = model.split("/")
    host, namespace, repo = ([OLLAMA_REGISTRY, "library", *parts] if len(parts) == 1 else
                             [OLLAMA_REGISTRY, *parts] if len(parts) == 2 else parts[:3])
    store = ollama_store()
    manifest = store / "manifests" / host / namespace / repo / (tag or "latest")
    if not manifest.is_file():
        where = (f"in the Ollama store {store}" if store.is_dir()
                 else f"here: no Ollama store at {store} (OLLAMA_MODELS)")
        raise QDyLoRAError(f"{name} looks like an Ollama model name and there is no {ref} {where}: "
                           f"run `ollama pull {ref}`, or pass the model's .gguf file or a Hugging Face model")
    try:
        layers = json.loads(manifest.read_text()).get("layers", [])
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_LAYER)
    except (ValueError, StopIteration, KeyError, TypeError, AttributeError):
        raise QDyLoRAError(f"the Ollama manifest {manifest} names no model layer: pull {ref} again") from None
    blob = store / "blobs" / str(digest).replace(":", "-")
    if not blob.is_file():
        raise QDyLoRAError(f"the Ollama model {ref} lacks its weights {blob}: run `ollama pull {ref}` again")
    return ModelSource(str(blob.parent), blob.name)


def bnb_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's storage: NF4, blocksize 64, double quantization of the absmax."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=QUANT_TYPE,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_causal_lm(
    src: ModelSource,
    compute_dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    frozen_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """The model with its block linears already NF4 (safetensors), or in `frozen_dtype` (GGUF);
    the other weights in `frozen_dtype` (default: `compute_dtype`).

    Weights are read from safetensors or GGUF only, never from pickle files. A local checkpoint's
    pages are dropped from the page cache once loaded (`release_page_cache`).
    """
    kwargs = dict(dtype=frozen_dtype or compute_dtype, trust_remote_code=trust_remote_code)
    try:
        if src.gguf_file is not None:
            model = AutoModelForCausalLM.from_pretrained(
                src.path, gguf_file=src.gguf_file, device_map={"": device}, **kwargs
            )
            forget_quantizer(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                src.path,
                quantization_config=bnb_config(compute_dtype),
                device_map={"": device},
                use_safetensors=True,
                **kwargs,
            )
    except SafetensorError as e:  # a truncated or corrupted model.safetensors (its header or data)
        raise QDyLoRAError(f"the weights in {src.path} are damaged or truncated ({_first_line(e)}): "
                           "download or copy the model again") from e
    except (OSError, ValueError, KeyError, struct.error) as e:  # struct.error: a GGUF cut inside its header
        raise QDyLoRAError(f"cannot load a causal LM from {_named(src)}: {_explain(e, src)}") from e
    if src.is_local:
        release_page_cache(Path(src.path), [src.gguf_file] if src.gguf_file else None)
    return model


def release_page_cache(directory: Path, names: Optional[list[str]] = None) -> None:
    """Tell the kernel that the weight files in `directory` (`names`, default every .safetensors)
    will not be read again, so it drops their clean cached pages now instead of evicting other
    memory first: a 4-bit model is about a quarter of its checkpoint, and the checkpoint's pages
    would otherwise fill the RAM the training needs (docs/performance.md, "Scale"). Pages the
    model still maps (weights kept in the file's dtype, which transformers leaves memory-mapped)
    stay. Linux only; a no-op elsewhere."""
    if not hasattr(os, "posix_fadvise"):
        return
    files = [directory / n for n in names] if names else sorted(directory.glob("*.safetensors"))
    # the loader's file handles can sit in reference cycles until the next collection, and pages
    # a live mapping holds are not dropped: collect first (milliseconds, once per load)
    gc.collect()
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def release_freed_heap() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim; elsewhere a no-op).

    Loading quantizes tensor by tensor: blocks under glibc's mmap threshold (32 MiB), such as a
    30B model's packed attention weights and every temporary float32 absmax, come from the heap,
    and the temporaries freed between the weights that stay leave holes that glibc keeps. On the
    30B-shaped checkpoint of docs/performance.md ("Scale") that was about 2 GiB after loading.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    """The model's tokenizer (from the GGUF file when the model is one)."""
    try:
        return AutoTokenizer.from_pretrained(
            src.path, gguf_file=src.gguf_file, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise QDyLoRAError(f"cannot load a tokenizer from {_named(src)}: {_explain(e, src)}") from e


def _named(src: "ModelSource") -> str:
    """The file a GGUF model is read from, else its directory or hub id."""
    return str(Path(src.path) / src.gguf_file) if src.gguf_file else src.path


def forget_quantizer(model: nn.Module) -> None:
    """Drop transformers' record of how the model was quantized, once its weights are plain
    (a GGUF model loads dequantized; a merged model is dequantized), so `save_pretrained` and
    `.to(dtype)` treat it as the plain model it is."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method


def _explain(e: BaseException, src: ModelSource) -> str:
    text = _first_line(e)
    if isinstance(e, struct.error):
        return f"the file is cut short or damaged ({text}): copy it again"
    if "Unrecognized configuration class" in text:
        return ("it is not a decoder-only causal LM (qdylora fine-tunes models such as Llama, "
                "Mistral, Qwen2, GPT-2, OPT, Falcon)")
    if "no file named model.safetensors" in text:
        return (f"{text} (qdylora reads weights from safetensors only; re-save the model with "
                "save_pretrained(..., safe_serialization=True))")
    if not src.is_local:
        return f"{text} (a hub id needs network access, or give a local copy's path)"
    return text


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]

