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
import errno
import hashlib
import json
import os
import re
import shutil
import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import SafetensorError

try:
    import fcntl  # POSIX; elsewhere runs are not locked
except ImportError:  # pragma: no cover
    fcntl = None

from ..console import log
from ..core.devices import resolve_device
from ..core.loading import load_tokenizer, resolve_source
from ..core.model import QDyLoRAModel, prepare
from ..errors import QDyLoRAError
from ..export import PEFT_FILES
from ..files import atomic_dir, atomic_write, is_temp_name, remove_tree
from .adapter_file import base_fingerprint, load_adapter, read_adapter_metadata
from .settings import RunSettings

CONFIG, DATA_STATS, ADAPTER, METRICS, SUMMARY = (
    "config.json", "data_stats.json", "adapter.safetensors", "metrics.jsonl", "summary.json")
CHECKPOINTS, TENSORBOARD, STATE, MANIFEST = "checkpoints", "tensorboard", "state.pt", "manifest.json"
ALLOCATIONS = "allocations"  # RUN/allocations/<name>.json: per-layer ranks (evaluation.budgets)
CALIBRATION_FILE = "calibration.safetensors"  # RUN's calibration statistics (training.calibration)
OURS = (CONFIG, DATA_STATS, ADAPTER, METRICS, SUMMARY, CHECKPOINTS, TENSORBOARD, "sweep.json", "sweep.csv",
        "sweep.png", "peft", ALLOCATIONS, CALIBRATION_FILE)


# What --overwrite may remove inside the run's own folders: (folder, pattern of a path in it)
_OWN_FILES = {
    # step-N, and a damaged one set aside (step-N.damaged, .damaged.1, ...) with whatever it held
    CHECKPOINTS: re.compile(r"step-\d+(/(%s))?|step-\d+\.damaged(\.\d+)?(/.*)?"
                            % "|".join(map(re.escape, (ADAPTER, STATE, MANIFEST)))),
    # the demo's export, or `export --ranks ... --out RUN/peft` (rank-N/ folders)
    "peft": re.compile(r"(rank-\d+/)?(%s)|rank-\d+" % "|".join(map(re.escape, PEFT_FILES))),
    ALLOCATIONS: re.compile(r"[^/]+\.json"),
    TENSORBOARD: re.compile(r"events\.out\.tfevents\.[^/]+"),
}


def foreign_in_run(out: Path) -> Optional[str]:
    """The first thing --overwrite would remove from the run directory `out` that qdylora did not
    write there: a link among the run's names (removing through it reaches outside the run) or a
    file of someone else's in the run's own folders; None when there is none. Checked before
    anything is removed, so a refusal leaves the old run whole."""
    for name in OURS:
        path = out / name
        if path.is_symlink():
            return f"{path} (a symbolic link)"
        if name not in _OWN_FILES or not path.is_dir():
            continue
        for entry in sorted(path.rglob("*")):
            if entry.is_symlink():
                return f"{entry} (a symbolic link)"
            if not (_OWN_FILES[name].fullmatch(entry.relative_to(path).as_posix()) or is_temp_name(entry.name)):
                return str(entry)
    return None


def check_out_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to start where a run would clobber something, before any heavy work."""
    if resume:
        if not (out / CONFIG).is_file():
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
    foreign = foreign_in_run(out)
    if foreign is not None:
        raise QDyLoRAError(f"--overwrite would remove {foreign}, which qdylora did not write there: move it "
                           "out of the run, or choose another --out")


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
        record = json.loads((out / CONFIG).read_text())
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


CHECKPOINT_FILES = (ADAPTER, STATE)


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


def check_resumable(out: Path, fingerprint: str, global_batch: int,
                    data_fingerprint: Optional[dict] = None) -> None:
    """Refuse to resume `out` with another base model, other data (rows changed in the file: the
    data order and the validation split would silently differ), a newer qdylora's files or
    another global batch (the data order and the optimizer's steps would no longer line up)."""
    saved = read_json(out / CONFIG)
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
        train = saved.get("settings", {}).get("train", {})
        procs = saved.get("processes", 1)
        micro, accumulation = train.get("micro_batch_size"), train.get("grad_accumulation")
        raise QDyLoRAError(
            f"cannot resume {out} with a global batch of {global_batch} (micro-batch x processes x "
            f"accumulation); it was trained with {saved['global_batch']}: keep that product, e.g. as it "
            f"was trained: {procs} process{'es' if procs != 1 else ''} x --micro-batch-size {micro} x "
            f"--grad-accumulation {accumulation}")


def checkpoint_dirs(out: Path) -> list[Path]:
    """Checkpoint directories (step-N, N a number), oldest first; intact or not."""
    root = out / CHECKPOINTS
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
    if not (checkpoint / MANIFEST).is_file():
        return None  # an older qdylora wrote no manifest; a renamed directory is complete anyway
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
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


@dataclass
class CheckpointState:
    """What a checkpoint's state.pt holds besides the adapter: where the run stands, and the
    optimizer, scheduler and random generators to go on exactly (plain tensors and numbers, for
    `torch.load(weights_only=True)`)."""

    step: int
    tokens_seen: int
    seconds: float
    optimizer: dict
    scheduler: dict
    rng_cpu: torch.Tensor
    rng_cuda: Optional[torch.Tensor] = None
    micro_batch_position: int = 0  # micro-batches consumed: step x accumulation
    optim: str = "adamw"  # checkpoints before --optim existed are AdamW's
    optimizer_in_backward: bool = False

    def to_dict(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, state: dict) -> "CheckpointState":
        known = {k: state[k] for k in cls.__dataclass_fields__ if k in state}
        return cls(**known)


# What resuming cannot do without (the other fields have defaults for older checkpoints).
STATE_KEYS = tuple(name for name, f in CheckpointState.__dataclass_fields__.items()
                   if f.default is dataclasses.MISSING)


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
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    with atomic_dir(final, overwrite=True) as tmp:
        write_adapter(tmp / ADAPTER)
        with open(tmp / STATE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                    for name in CHECKPOINT_FILES}
        with atomic_write(tmp / MANIFEST) as t:
            t.write_text(json.dumps(manifest, indent=1) + "\n")
    with atomic_write(out / ADAPTER) as t:  # one replacement: a reader sees old or new
        if write_run_adapter is not None:  # the run's adapter differs from the checkpoint's (SVD order)
            write_run_adapter(t, final / ADAPTER)
        else:
            shutil.copyfile(final / ADAPTER, t)
    for old in checkpoint_dirs(out)[:-keep_last]:
        remove_tree(old)  # a kill during the removal must not leave a partial step-N behind
    return final


def load_state(checkpoint: Path) -> dict:
    """The training state of a checkpoint (tensors and plain values only)."""
    try:
        return torch.load(checkpoint / STATE, map_location="cpu", weights_only=True)
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
    for folder in (out, out / CHECKPOINTS):
        if folder.is_dir():
            for leftover in folder.glob(".*.tmp"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


class MetricsLog:
    """metrics.jsonl, one JSON object a line; on resume, lines past the resumed step are dropped
    so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: Optional[int] = None) -> None:
        self.path = path
        self.resumed_validation: Optional[dict[int, float]] = None  # the resumed step's, if it was logged
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text(errors="replace").splitlines()
                    if (record := _json_line(line)) is not None and record.get("step", 0) <= resume_step]
            with atomic_write(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in keep))
            for record in map(_json_line, keep):
                if record.get("step") == resume_step and isinstance(record.get("val_loss"), dict):
                    self.resumed_validation = {int(r): float(v) for r, v in record["val_loss"].items()}
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
    if not (run / CONFIG).is_file():
        raise QDyLoRAError(f"{run} is not a qdylora run directory (no config.json)")
    if not (run / ADAPTER).is_file():
        raise QDyLoRAError(f"{run} has no adapter.safetensors yet: train it (or resume it) first")
    record = read_json(run / CONFIG)
    try:
        settings = RunSettings.from_dict(record["settings"], where=str(run / CONFIG))
    except (KeyError, TypeError):
        raise QDyLoRAError(f"{run / 'config.json'} is not a qdylora run config") from None
    check_version(record, run)
    adapter = run / ADAPTER
    meta = read_adapter_metadata(adapter)
    if in_use(run):
        log.warning(f"{run} is still training: this is its adapter after step {meta['extra'].get('step', '?')}, "
                    "not the final one")
    # the adapter file's scale rule wins (an SVD-ordered adapter, --order svd, is "nested"), and its
    # base format: the one it was trained on ("auto" resolved; NF4 for files before GGUF bases)
    saved = meta["config"]
    settings = replace(settings, adapter=replace(settings.adapter, scaling=saved.scaling,
                                                 base_format=saved.base_format))
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


@dataclass(frozen=True)
class RunDir:
    """One run directory and every file in it: their names and formats (the module docstring),
    the steps of a run's life the trainer takes (check, own, start or resume, log, checkpoint,
    finish), and the reading side the other commands use (record, settings, data fingerprint,
    summary, the loaded model)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __str__(self) -> str:
        return str(self.path)

    config = property(lambda self: self.path / CONFIG)
    data_stats = property(lambda self: self.path / DATA_STATS)
    adapter = property(lambda self: self.path / ADAPTER)
    metrics = property(lambda self: self.path / METRICS)
    summary_file = property(lambda self: self.path / SUMMARY)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    tensorboard = property(lambda self: self.path / TENSORBOARD)

    # --- writing: the trainer -------------------------------------------------------------
    def check_out(self, overwrite: bool, resume: bool) -> None:
        """Refuse to start where the run would clobber something (before any heavy work)."""
        check_out_dir(self.path, overwrite, resume)

    def owned(self):
        """Held by this process while the block runs (a second `train` on it is refused)."""
        return owned(self.path)

    def start(self, overwrite: bool) -> None:
        """A new run: what an earlier run wrote is cleared (with --overwrite)."""
        if overwrite:
            clear_run(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    def check_resumable(self, record: dict, global_batch: int) -> None:
        """Refuse to resume with another base, other rows, a newer qdylora's files or another global batch."""
        check_resumable(self.path, record["base_fingerprint"], global_batch,
                        record.get("data_fingerprint"))

    def resume_from(self, tidy: bool) -> tuple[Path, CheckpointState]:
        """The newest intact checkpoint's adapter file and training state; with `tidy` (one process
        only), leftovers of killed writes are removed and damaged checkpoints set aside first."""
        if tidy:
            remove_leftovers(self.path)
        checkpoint = resume_checkpoint(self.path)
        return checkpoint / ADAPTER, CheckpointState.from_dict(load_state(checkpoint))

    def write_record(self, record: dict, stats: Optional[dict] = None) -> None:
        """config.json (`run_record`: every setting, fingerprints, version) and data_stats.json."""
        write_json(self.config, record)
        if stats is not None:
            write_json(self.data_stats, stats)

    def running(self, val_loss_before: dict) -> None:
        """summary.json while training: the validation loss before it, read back on resume."""
        write_json(self.summary_file, {"status": "running", "val_loss_before": val_loss_before})

    def interrupted(self, steps: int, val_loss_before: Optional[dict]) -> None:
        """summary.json of a run stopped by a signal after a checkpoint."""
        write_json(self.summary_file, {"status": "interrupted", "steps": steps, "val_loss_before": val_loss_before})

    def finish(self, steps: int, tokens: int, seconds: float, peak_memory_bytes: int,
               val_loss_before: Optional[dict], val_loss_after: dict) -> dict:
        """summary.json of a finished run; returns it."""
        summary = {
            "status": "done", "steps": steps, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 2) if seconds else None,
            "peak_memory_bytes": peak_memory_bytes, "val_loss_before": val_loss_before,
            "val_loss_after": {str(r): v for r, v in val_loss_after.items()}, "adapter": str(self.adapter),
        }
        write_json(self.summary_file, summary)
        return summary

    def save_checkpoint(self, write_adapter, state: CheckpointState, keep_last: int,
                        write_run_adapter=None) -> Path:
        """checkpoints/step-N and RUN/adapter.safetensors (`save_checkpoint`); a write that fails
        for want of space (or a checkpoint folder that cannot be written) is one line that says
        which, and that the earlier checkpoints are intact. Returns the checkpoint's adapter file."""
        try:
            return save_checkpoint(self.path, state.step, write_adapter, state.to_dict(), keep_last,
                                   write_run_adapter) / ADAPTER
        except (OSError, RuntimeError, SafetensorError) as e:
            # a full disk is ENOSPC from our own writes, but torch.save says RuntimeError ("file
            # write failed") and safetensors SafetensorError: then the free space tells
            full = (e.errno in (errno.ENOSPC, errno.EDQUOT) if isinstance(e, OSError)
                    else shutil.disk_usage(self.path).free < 2**20)
            if not full and not isinstance(e, OSError):
                raise
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:200]
            where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
            fix = "free space" if full else "mend that"  # a symlinked or read-only checkpoint folder is not a full disk
            raise QDyLoRAError(
                f"cannot write the step-{state.step} checkpoint in {self.path}{' (disk full)' if full else ''}: "
                f"{reason}{where}; the earlier checkpoints are intact: {fix} and --resume {self.path}") from None

    # --- reading: sweep, export, merge, generate, resume ------------------------------------
    def record(self) -> dict:
        """config.json as written."""
        return read_json(self.config)

    def data_fingerprint(self) -> dict:
        """{"train", "validation"}: the fingerprints of the rows the run read (empty for runs of
        a qdylora before they were recorded)."""
        return self.record().get("data_fingerprint") or {}

    def summary(self) -> Optional[dict]:
        """summary.json, or None before the run wrote one."""
        return read_json(self.summary_file) if self.summary_file.exists() else None



class RunLog:
    """metrics.jsonl and TensorBoard of a run, written by process 0 only (`main`)."""

    def __init__(self, run: RunDir, main: bool, tensorboard: bool, resume_step: Optional[int]) -> None:
        self.metrics = MetricsLog(run.metrics, resume_step=resume_step) if main else None
        self.tensorboard = tensorboard_writer_class()(str(run.tensorboard)) if tensorboard and main else None

    @property
    def resumed_validation(self) -> Optional[dict[int, float]]:
        """The validation logged at the step a run resumed from (None: none was, or not resumed)."""
        return self.metrics.resumed_validation if self.metrics is not None else None

    def step(self, record: dict) -> None:
        """One optimizer step: {"step", "rank", "loss", "lr", "grad_norm", "tokens", "seconds", "elapsed"}."""
        if self.metrics is None:
            return
        self.metrics.write(record)
        if self.tensorboard:
            self.tensorboard.add_scalar("train/loss", record["loss"], record["step"])
            if isinstance(record["rank"], int):
                self.tensorboard.add_scalar("train/rank", record["rank"], record["step"])
            self.tensorboard.add_scalar("train/lr", record["lr"], record["step"])

    def skipped(self, step: int, rank) -> None:
        if self.metrics is not None:
            self.metrics.write({"step": step, "rank": rank, "skipped": "nonfinite loss or gradient"})

    def validation(self, step: int, losses: dict[int, float]) -> None:
        if self.metrics is None:
            return
        self.metrics.write({"step": step, "val_loss": {str(r): v for r, v in losses.items()}})
        if self.tensorboard:
            for r, v in losses.items():
                self.tensorboard.add_scalar(f"val_loss/rank_{r}", v, step)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.tensorboard:
            self.tensorboard.close()


def tensorboard_writer_class():
    """TensorBoard's SummaryWriter, or one line saying which package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise QDyLoRAError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter
