"""The run directory: what a training run writes, its checkpoints, and opening a finished run.

    RUN/
      config.json            every setting used (adapter config with the resolved dtype),
                             the base model's fingerprint, the qdylora version
      data_stats.json        rows kept, truncated and dropped, for train and validation
      adapter.safetensors    the newest adapter (full max_rank A and B, metadata: config,
                             scaling rule, rank range, base fingerprint, tensors' SHA-256)
      metrics.jsonl          one JSON line per logged step and per validation
      summary.json           written at the end: validation losses, tokens/s, peak memory
      checkpoints/step-000100/{adapter.safetensors, state.pt, manifest.json}   the last --keep-last

`state.pt` holds the optimizer, scheduler and RNG states and the step; it is plain tensors and
numbers, loaded with `torch.load(weights_only=True)`. `manifest.json` holds each file's size and
SHA-256, so a truncated or corrupted checkpoint is found before resuming from it (safetensors
itself has no checksum) and resuming falls back to the newest checkpoint that is intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

try:
    import fcntl  # POSIX; elsewhere runs are not locked
except ImportError:  # pragma: no cover
    fcntl = None

from ..console import log
from ..core.devices import resolve_device
from ..core.loading import load_tokenizer, resolve_source
from ..core.model import QDyLoRAModel, prepare
from ..errors import QDyLoRAError
from ..files import atomic_dir, atomic_write, remove_tree
from .adapter_file import base_fingerprint, load_adapter, read_adapter_metadata
from .settings import RunSettings

ALLOCATIONS = "allocations"  # RUN/allocations/<name>.json: per-layer ranks (evaluation.budgets)
CALIBRATION_FILE = "calibration.safetensors"  # RUN's calibration statistics (training.calibration)
OURS = ("config.json", "data_stats.json", "adapter.safetensors", "metrics.jsonl", "summary.json",
        "checkpoints", "tensorboard", "sweep.json", "sweep.csv", "sweep.png", "peft", ALLOCATIONS,
        CALIBRATION_FILE)


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
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise QDyLoRAError(
            f"output directory {out} already exists and is not empty: use --overwrite to replace "
            f"the run in it, --resume {out} to continue it, or another --out"
        )
    if not is_run_dir(out):
        # --overwrite removes a run's files by name: in another directory (a model's) those
        # names are someone else's files (it replaced a model's config.json)
        raise QDyLoRAError(
            f"output directory {out} is not a qdylora run (no run config.json in it): --overwrite only "
            "replaces a run; choose an empty or new --out"
        )


def run_record(settings: RunSettings, model: QDyLoRAModel, **extra: Any) -> dict:
    """config.json of a run: every setting (the model's adapter config, compute dtype resolved),
    the base's fingerprint, the qdylora version, and `extra` (processes, global batch)."""
    from .._version import __version__

    settings = replace(settings, adapter=model.qdylora_config)
    return {"qdylora_version": __version__, "base_fingerprint": base_fingerprint(model), **extra,
            "settings": settings.to_dict()}


def is_run_dir(out: Path) -> bool:
    """True if `out` holds a qdylora run: a config.json that a run wrote."""
    try:
        record = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "qdylora_version" in record and "settings" in record


@contextlib.contextmanager
def owned(out: Path) -> Iterator[None]:
    """Hold the run directory `out` for this process while the block runs: a second
    `qdylora train` (or `--resume`) on it is refused instead of both writing into it. The lock
    is the operating system's (flock on the directory), so a killed process leaves none behind.
    A directory made here for the run and still empty afterwards (the run failed before writing)
    is removed again."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        if not _lock(fd):
            raise QDyLoRAError(f"run directory {out} is in use by another qdylora train process: wait "
                               "for it to finish (or stop it), or choose another --out")
        yield
    finally:
        os.close(fd)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def in_use(out: Path) -> bool:
    """True while a `qdylora train` process holds the run directory (see `owned`)."""
    if not out.is_dir():
        return False
    fd = os.open(out, os.O_RDONLY)
    try:
        return not _lock(fd)
    finally:
        os.close(fd)  # closing the descriptor releases a lock taken here


def _lock(fd: int) -> bool:
    """Take the exclusive lock of the open directory `fd` without waiting; False if another
    process holds it (True where there are no locks: not POSIX)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


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


CHECKPOINT_FILES = ("adapter.safetensors", "state.pt")


def check_version(record: dict, run: Path) -> None:
    """Refuse a run directory written by a newer qdylora (its files may mean something else)."""
    from packaging.version import InvalidVersion, Version

    from .._version import __version__

    saved = record.get("qdylora_version")
    if not isinstance(saved, str):
        raise QDyLoRAError(f"{run / 'config.json'} does not say which qdylora wrote it: not a qdylora run")
    try:
        newer = Version(saved) > Version(__version__)
    except InvalidVersion:
        raise QDyLoRAError(f"{run / 'config.json'} names an unknown qdylora version {saved!r}") from None
    if newer:
        raise QDyLoRAError(f"{run} was written by qdylora {saved}, newer than this qdylora "
                           f"{__version__}: upgrade qdylora (pip install -U qdylora) to read it")


def check_resumable(out: Path, fingerprint: str, global_batch: int, micro_batch_size: int,
                    data_fingerprint: Optional[dict] = None) -> None:
    """Refuse to resume `out` with another base model, other data (rows changed in the file: the
    data order and the validation split would silently differ), a newer qdylora's files or
    another global batch (the data order and the optimizer's steps would no longer line up)."""
    saved = read_json(out / "config.json")
    check_version(saved, out)
    if saved.get("base_fingerprint") != fingerprint:
        raise QDyLoRAError(f"cannot resume {out}: it was trained on another base model "
                           f"({saved['settings'].get('model')})")
    before = saved.get("data_fingerprint")  # absent in runs of qdylora before it was recorded
    if before and data_fingerprint and before != data_fingerprint:
        changed = " and ".join(k for k in ("train", "validation") if before.get(k) != data_fingerprint.get(k))
        raise QDyLoRAError(f"cannot resume {out}: its {changed} rows changed since the run started "
                           f"({saved['settings'].get('data', {}).get('data')}): resume on the rows it was trained "
                           "on, or start a new run on the new rows (--out NEW_RUN)")
    if saved.get("global_batch", global_batch) != global_batch:
        raise QDyLoRAError(
            f"cannot resume {out} with a global batch of {global_batch} (micro-batch x processes x "
            f"accumulation); it was trained with {saved['global_batch']}: keep that product, e.g. "
            f"{saved.get('processes', 1)} processes x micro-batch {micro_batch_size}")


def checkpoint_dirs(out: Path) -> list[Path]:
    """Checkpoint directories (step-N, N a number), oldest first; intact or not."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out: Path) -> Optional[Path]:
    found = checkpoint_dirs(out)
    return found[-1] if found else None


def stop_advice(out: Path) -> str:
    """What to do after a run stopped at once (a second Ctrl-C, or one before training began):
    `--resume` only where there is a checkpoint to resume from."""
    if latest_checkpoint(out) is not None:
        return f"stopped; continue from the last checkpoint with: qdylora train --resume {out}"
    if out.is_dir() and is_run_dir(out):
        return (f"stopped before the first checkpoint: there is nothing to resume; start the run again "
                f"with --out {out} --overwrite")
    return "stopped before the run wrote anything: start it again"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_problem(checkpoint: Path) -> Optional[str]:
    """Why `checkpoint` cannot be resumed from (missing file, size or checksum mismatch,
    unreadable training state), or None when it is intact."""
    for name in CHECKPOINT_FILES:
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    if not (checkpoint / "manifest.json").is_file():
        return None  # an older qdylora wrote no manifest; a renamed directory is complete anyway
    try:
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        for name in CHECKPOINT_FILES:
            size, digest = manifest[name]["bytes"], manifest[name]["sha256"]
            actual = (checkpoint / name).stat().st_size
            if actual != size:
                return f"{name} has {actual} bytes, {size} were written (truncated?)"
            if _sha256(checkpoint / name) != digest:
                return f"{name} does not match its checksum (corrupted)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"manifest.json is unreadable ({type(e).__name__}: {e})"
    return _state_problem(checkpoint)


# What resuming reads from state.pt (rng_cuda and micro_batch_position are optional).
STATE_KEYS = ("step", "tokens_seen", "seconds", "optimizer", "scheduler", "rng_cpu")


def _state_problem(checkpoint: Path) -> Optional[str]:
    """Why state.pt cannot be resumed from, even with a matching manifest (a file crafted or
    written by something else): unreadable, or without what resuming needs."""
    try:
        state = load_state(checkpoint)
    except QDyLoRAError as e:
        return f"state.pt is unreadable ({str(e).splitlines()[0][:200]})"
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    return f"state.pt lacks {', '.join(missing)}" if missing else None


def resume_checkpoint(out: Path) -> Path:
    """The newest intact checkpoint. Damaged newer ones are reported on stderr and renamed to
    step-N.damaged (kept for inspection, out of the way of --keep-last and later resumes)."""
    found = checkpoint_dirs(out)
    for checkpoint in reversed(found):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        aside = _free_name(checkpoint.with_name(checkpoint.name + ".damaged"))
        os.replace(checkpoint, aside)
        log.warning(f"checkpoint {checkpoint.name} is damaged ({problem}); moved to {aside.name}, "
                    "trying an older one")
    if found:
        raise QDyLoRAError(f"cannot resume {out}: none of its {len(found)} checkpoints is intact; "
                           "start again with --overwrite")
    raise QDyLoRAError(f"cannot resume: {out} has no checkpoint yet; start it again with --overwrite")


def _free_name(path: Path) -> Path:
    """`path`, or path.1, path.2, ... : the first that does not exist (a damaged checkpoint is
    always moved out of the way, even when an earlier one of that step was moved before)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def save_checkpoint(out: Path, step: int, write_adapter, state: dict, keep_last: int,
                    write_run_adapter=None) -> Path:
    """Write checkpoints/step-N (adapter + state) as one rename, refresh RUN/adapter.safetensors,
    then drop the oldest checkpoints beyond `keep_last`.

    `write_adapter(path)` writes the checkpoint's adapter file; `write_run_adapter(path, written)`,
    when given, writes RUN/adapter.safetensors (`written`: the checkpoint's adapter file, for what
    it may read back; without it RUN's is a copy of the checkpoint's).
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
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                    for name in CHECKPOINT_FILES}
        with atomic_write(tmp / "manifest.json") as t:
            t.write_text(json.dumps(manifest, indent=1) + "\n")
    with atomic_write(out / "adapter.safetensors") as t:  # one replacement: a reader sees old or new
        if write_run_adapter is not None:  # the run's adapter differs from the checkpoint's (SVD order)
            write_run_adapter(t, final / "adapter.safetensors")
        else:
            shutil.copyfile(final / "adapter.safetensors", t)
    for old in checkpoint_dirs(out)[:-keep_last]:
        remove_tree(old)  # a kill during the removal must not leave a partial step-N behind
    return final


def load_state(checkpoint: Path) -> dict:
    """The training state of a checkpoint (tensors and plain values only)."""
    try:
        return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise QDyLoRAError(f"cannot read training state {checkpoint / 'state.pt'}: {e}") from None


def _json_line(line: str) -> Optional[dict]:
    """A metrics line, or None for a blank or partial one (a run killed while writing it)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def remove_leftovers(out: Path) -> None:
    """Delete temporary files and directories of writes a killed run did not finish
    (".<name>.<random>.tmp", made by files.atomic_write / atomic_dir)."""
    for folder in (out, out / "checkpoints"):
        if folder.is_dir():
            for leftover in folder.glob(".*.tmp"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


class MetricsLog:
    """metrics.jsonl, one JSON object a line; on resume, lines past the resumed step are dropped
    so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: Optional[int] = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text(errors="replace").splitlines()
                    if (record := _json_line(line)) is not None and record.get("step", 0) <= resume_step]
            with atomic_write(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in keep))
        self._file = open(path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def load_run_settings(run_dir: str | Path, trust_remote_code: bool = False) -> tuple[RunSettings, Path]:
    """A run's settings and its adapter file; refuses a directory that is not a finished-enough run.

    A run directory may come from someone else: its saved trust_remote_code is ignored, the
    caller's `trust_remote_code` (the user's own flag) is used instead."""
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise QDyLoRAError(f"{run} is not a qdylora run directory (no config.json)")
    if not (run / "adapter.safetensors").is_file():
        raise QDyLoRAError(f"{run} has no adapter.safetensors yet: train it (or resume it) first")
    record = read_json(run / "config.json")
    try:
        settings = RunSettings.from_dict(record["settings"], where=str(run / "config.json"))
    except (KeyError, TypeError):
        raise QDyLoRAError(f"{run / 'config.json'} is not a qdylora run config") from None
    check_version(record, run)
    adapter = run / "adapter.safetensors"
    meta = read_adapter_metadata(adapter)
    if in_use(run):
        log.warning(f"{run} is still training: this is its adapter after step {meta['extra'].get('step', '?')}, "
                    "not the final one")
    # the adapter file's scale rule wins: an SVD-ordered adapter (--order svd) is "nested"
    scaling = meta["config"].scaling
    settings = replace(settings, adapter=replace(settings.adapter, scaling=scaling))
    return replace(settings, trust_remote_code=trust_remote_code), adapter


def load_run(run_dir: str | Path, device: Optional[str] = None,
             trust_remote_code: bool = False) -> tuple[QDyLoRAModel, object, RunSettings]:
    """The base model of a training run with its adapter loaded, its tokenizer and settings.

    Refuses a run without an adapter and a base model whose fingerprint differs from the run's.
    """
    settings, adapter = load_run_settings(run_dir, trust_remote_code)
    # the run's saved device is a preference: a run trained on a GPU opens on a CPU
    where = resolve_device(device) if device else resolve_device(settings.device, preference=True)
    model = prepare(settings.model, settings.adapter, device=where,
                    trust_remote_code=settings.trust_remote_code)
    load_adapter(model, adapter)  # checks the base fingerprint
    tokenizer = load_tokenizer(resolve_source(settings.model), settings.trust_remote_code)
    return model, tokenizer, settings
