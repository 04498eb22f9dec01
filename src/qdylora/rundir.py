"""The run directory: what a training run writes, and its checkpoints.

    RUN/
      config.json            every setting used (adapter config with the resolved dtype),
                             the base model's fingerprint, the qdylora version
      data_stats.json        rows kept, truncated and dropped, for train and validation
      adapter.safetensors    the newest adapter (full max_rank A and B, metadata: config,
                             scaling rule, rank range, base fingerprint)
      metrics.jsonl          one JSON line per logged step and per validation
      summary.json           written at the end: validation losses, tokens/s, peak memory
      checkpoints/step-000100/{adapter.safetensors, state.pt}   the last --keep-last ones

`state.pt` holds the optimizer, scheduler and RNG states and the step; it is plain tensors and
numbers, loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import QDyLoRAError
from .files import atomic_dir, atomic_write

OURS = ("config.json", "data_stats.json", "adapter.safetensors", "metrics.jsonl", "summary.json",
        "checkpoints", "tensorboard", "sweep.json", "sweep.csv", "sweep.png", "peft")


def check_out_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to start where a run would clobber something, before any heavy work."""
    if resume:
        if not (out / "config.json").is_file():
            raise QDyLoRAError(f"cannot resume: {out} is not a qdylora run directory (no config.json)")
        if latest_checkpoint(out) is None:
            raise QDyLoRAError(f"cannot resume: {out} has no checkpoint yet; start it again with --overwrite")
        return
    if out.exists() and not out.is_dir():
        raise QDyLoRAError(f"output path {out} is a file: choose a directory for the run")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QDyLoRAError(
            f"output directory {out} already exists and is not empty: use --overwrite to replace "
            f"the run in it, --resume {out} to continue it, or another --out"
        )


def clear_run(out: Path) -> None:
    """Remove what an earlier run wrote (and only that: other files in `out` stay)."""
    for name in OURS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise QDyLoRAError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QDyLoRAError(f"{path} is not valid JSON ({e})") from None


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / "state.pt").is_file() and (p / "adapter.safetensors").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out: Path) -> Optional[Path]:
    found = checkpoint_dirs(out)
    return found[-1] if found else None


def save_checkpoint(out: Path, step: int, write_adapter, state: dict, keep_last: int) -> Path:
    """Write checkpoints/step-N (adapter + state) as one rename, refresh RUN/adapter.safetensors,
    then drop the oldest checkpoints beyond `keep_last`.

    `write_adapter(path)` writes the adapter file.
    """
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    with atomic_dir(final, overwrite=True) as tmp:
        write_adapter(tmp / "adapter.safetensors")
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    with atomic_write(out / "adapter.safetensors") as t:
        shutil.copyfile(final / "adapter.safetensors", t)
    for old in checkpoint_dirs(out)[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_state(checkpoint: Path) -> dict:
    """The training state of a checkpoint (tensors and plain values only)."""
    try:
        return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise QDyLoRAError(f"cannot read training state {checkpoint / 'state.pt'}: {e}") from None


class MetricsLog:
    """metrics.jsonl, one JSON object a line; on resume, lines past the resumed step are dropped
    so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: Optional[int] = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with atomic_write(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in keep))
        self._file = open(path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
