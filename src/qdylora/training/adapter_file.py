"""The adapter on disk: one safetensors file with every A and B at max_rank, and metadata
(config, rank rule, base fingerprint) so a file can refuse a model it was not trained on."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._version import __version__
from ..core.config import QDyLoRAConfig
from ..core.gains import check_gains, rank_gains, set_rank_gains
from ..core.model import QDyLoRAModel
from ..errors import QDyLoRAError
from ..files import atomic_write

FORMAT = "qdylora-adapter-1"


def base_fingerprint(model: QDyLoRAModel) -> str:
    """A short hash of the frozen base: architecture, every base tensor's name, shape and dtype,
    and sampled bytes of its data (start and middle), so a different checkpoint differs."""
    h = hashlib.sha256(type(model.model).__name__.encode())
    state = model.model.state_dict()
    for name in sorted(state):
        if ".lora_A" in name or ".lora_B" in name:
            continue
        t = state[name].detach().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)
        mid = flat.numel() // 2
        for chunk in (flat[:4096], flat[mid : mid + 4096]):
            h.update(chunk.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors (names, dtypes, shapes and bytes, in name order): stored in the
    file's metadata, since safetensors itself has no checksum (a flipped byte loaded silently)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_adapter(model: QDyLoRAModel, path: Union[str, os.PathLike], extra: dict | None = None) -> None:
    """Write the full max_rank adapter atomically. `extra` (JSON-able) joins the metadata."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.adapter_state_dict().items()}
    gains = rank_gains(model)
    metadata = {
        "format": FORMAT,
        "qdylora_version": __version__,
        "config": json.dumps(model.qdylora_config.to_dict()),
        "base_model_name_or_path": model.base_model_name_or_path,
        "base_fingerprint": base_fingerprint(model),
        "extra": json.dumps(extra or {}),
        "tensors_sha256": tensors_digest(tensors),
        **({"rank_gains": json.dumps(list(gains))} if gains is not None else {}),  # g(1..R), `core.gains`
    }
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read_adapter_metadata(path: Union[str, os.PathLike]) -> dict:
    """The metadata of an adapter file, with "config" and "extra" decoded."""
    return read_adapter(path, tensors=False)[0]


def read_adapter(path: Union[str, os.PathLike], tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """The decoded metadata and (`tensors`) the tensors of one version of an adapter file. A
    trainer replaces RUN/adapter.safetensors by a rename at every checkpoint, and safetensors
    reads the header and the tensors at different moments: a read during a rename paired one
    file's checksum with the next one's tensors (measured: 4 of 300 reads beside a process
    replacing it). So the file is read again while its identity (inode, size, mtime) changed
    during the read."""
    for _ in range(REREADS):
        before = _identity(path)
        meta, state = _read_once(path, tensors)
        if _identity(path) == before:
            return meta, state
    raise QDyLoRAError(f"adapter file {path} was replaced {REREADS} times while being read (a run writing "
                       "checkpoints every few seconds): read it again, or read a checkpoint's adapter")


REREADS = 5


def _identity(path) -> Optional[tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _read_once(path, tensors: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:  # the file as it was when opened
            meta = _decoded(dict(f.metadata() or {}), path)
            try:
                state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
            except (SafetensorError, OSError, ValueError) as e:
                raise QDyLoRAError(f"adapter file {path} is damaged ({e})") from None
    except QDyLoRAError:
        raise  # already says what is wrong with the file (a ValueError too)
    except FileNotFoundError:
        raise QDyLoRAError(f"adapter file {path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise QDyLoRAError(f"adapter file {path} is damaged or not a safetensors file ({e})") from None
    return meta, state


def _decoded(meta: dict, path) -> dict:
    """An adapter file's metadata checked, with "config", "extra" and "rank_gains" decoded."""
    if meta.get("format") != FORMAT:
        raise QDyLoRAError(f"{path} is not a qdylora adapter (format {meta.get('format')!r})")
    missing = [k for k in ("config", "base_fingerprint") if k not in meta]
    if missing:
        raise QDyLoRAError(f"adapter file {path} is damaged: its metadata has no {' and no '.join(missing)}")
    config = _json(meta["config"], path, "config")
    if isinstance(config, dict):
        config.setdefault("base_format", "nf4")  # files written before GGUF bases were on NF4
    meta["config"] = QDyLoRAConfig.from_dict(config, f"adapter file {path} config")
    meta["extra"] = _json(meta.get("extra", "{}"), path, "extra")
    if "rank_gains" in meta:
        try:
            gains = json.loads(meta["rank_gains"])
        except json.JSONDecodeError:
            gains = None
        meta["rank_gains"] = check_gains(gains, meta["config"].max_rank, f"adapter file {path} is damaged")
    return meta


def _json(text: str, path, key: str) -> dict:
    """A JSON object of the adapter file's metadata."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise QDyLoRAError(f"adapter file {path} is damaged: its metadata {key!r} is not valid JSON "
                           f"({e.msg})") from None
    if not isinstance(value, dict):
        raise QDyLoRAError(f"adapter file {path} is damaged: its metadata {key!r} is not a JSON object")
    return value


def load_adapter(model: QDyLoRAModel, path: Union[str, os.PathLike], check_base: bool = True) -> dict:
    """Load A and B into `model` (prepared with the same config); returns the metadata.

    Refuses a file trained on another base model unless `check_base` is False.
    """
    meta, state = read_adapter(path)
    saved, ours = meta["config"], model.qdylora_config
    for field in ("max_rank", "alpha", "scaling"):  # what changes the adapter's meaning
        if getattr(saved, field) != getattr(ours, field):
            raise QDyLoRAError(
                f"adapter {path} has {field}={getattr(saved, field)!r} but the model was prepared "
                f"with {field}={getattr(ours, field)!r}: prepare it with the adapter's config"
            )
    if check_base and meta["base_fingerprint"] != base_fingerprint(model):
        raise QDyLoRAError(
            f"adapter {path} was trained on another base model ({meta.get('base_model_name_or_path') or 'unnamed'}); "
            "load it on that model"
        )
    digest = meta.get("tensors_sha256")  # absent in files of qdylora 0.1 before it was added
    if digest is not None and tensors_digest(state) != digest:
        raise QDyLoRAError(f"adapter file {path} is damaged: its tensors do not match their checksum "
                           "(a changed or corrupted file); use a checkpoint's adapter or train again")
    model.load_adapter_state_dict(state)
    set_rank_gains(model, meta.get("rank_gains"))  # the file's gains, or none
    return meta
