"""The training loop: one run trains the adapter at every rank.

Each optimizer step trains the ranks its rank rule hands out (`sampling.micro_batch_ranks`, a
pure function of seed and step): one rank b ~ p_B for the whole step, a rank per example, an
example at several ranks, or the adapter averaged over p_B; rank b runs the truncated pair
B[:, :b] A[:b] scaled by s(b). Only A and B are trained (AdamW); the NF4 base is frozen.

    train -> _train: load, set up a `Job`, start or resume the run directory, then the loop:
             [interrupted? checkpoint and stop] -> run_step -> log -> evaluate -> checkpoint
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from transformers import get_scheduler

from ..console import log
from ..core.context import context_length, fit_lengths
from ..core.devices import resolve_device
from ..core.loading import load_tokenizer, resolve_source
from ..core.model import QDyLoRAModel, prepare
from ..core.ordering import order_by_svd, svd_ordered
from ..core.rank import set_rank
from ..core.scaling import RankMixture
from ..data.batching import BatchStream, collate, fixed_batches, pad_token_id
from ..data.embedded import smollm2_checkpoint
from ..data.rows import IGNORE, DataStats, Example, row_format, rows_fingerprint, run_rows, tokenize
from ..errors import QDyLoRAError, TrainingInterrupted
from . import distributed
from .adapter_file import load_adapter, save_adapter
from .losses import autocast_context, loss_sum, validation_loss
from .optimizers import InBackwardOptimizer, make_optimizer
from .rundir import (MetricsLog, check_out_dir, check_resumable, clear_run, load_state, owned, read_json,
                     remove_leftovers, resume_checkpoint, run_record, save_checkpoint, write_json)
from .sampling import RankSampler, micro_batch_ranks
from .settings import DataSettings, RunSettings, TrainSettings

SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass
class Datasets:
    train: list[Example]
    val: list[Example]
    stats: dict[str, DataStats]
    fingerprint: dict[str, str]  # {"train", "validation"}: `rows_fingerprint` of the rows read


def load_data(settings: RunSettings, tokenizer) -> Datasets:
    """Read, split and tokenize the training (and validation) rows, with clear errors."""
    d = settings.data
    rows, train_idx, val_rows, val_idx = run_rows(d, settings.adapter.seed)
    if not rows:
        raise QDyLoRAError(f"the training data {d.data} is empty")
    rf = row_format(d, rows[0].keys(), d.data)
    opts = dict(max_source_length=d.max_source_length, max_target_length=d.max_target_length,
                train_on_prompt=d.train_on_prompt)
    train, train_stats = _tokenize_subset(rows, train_idx, tokenizer, rf, opts)
    val, val_stats = _tokenize_subset(val_rows, val_idx, tokenizer, rf, opts)
    if not train:
        raise QDyLoRAError(
            f"no training example is left after tokenization ({train_stats}): check the format, "
            "the templates and --max-source-length / --max-target-length"
        )
    fingerprint = {"train": rows_fingerprint([rows[i] for i in train_idx]),
                   "validation": rows_fingerprint([val_rows[i] for i in val_idx])}
    return Datasets(train, val, {"train": train_stats, "validation": val_stats}, fingerprint)


def _tokenize_subset(rows, indices, tokenizer, rf, opts):
    # row numbers in errors are the file's own
    return tokenize([rows[i] for i in indices], tokenizer, rf, row_numbers=indices, **opts)


def with_absolute_paths(settings: RunSettings) -> RunSettings:
    """The model and data paths that exist here made absolute, so the run's config.json names
    them from any working directory (a relative `--model tiny/llama` read from elsewhere was taken
    for a hub id)."""
    def absolute(value: Optional[str]) -> Optional[str]:
        return os.path.abspath(value) if value and os.path.exists(value) else value

    data = replace(settings.data, data=absolute(settings.data.data), val_data=absolute(settings.data.val_data))
    return replace(settings, model=absolute(settings.model), data=data)


def fitted(data: DataSettings, model: torch.nn.Module) -> DataSettings:
    """`data` with its lengths cut to the positions the model reads (`fit_lengths`)."""
    source, target = fit_lengths(data.max_source_length, data.max_target_length, context_length(model))
    return replace(data, max_source_length=source, max_target_length=target)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated CUDA memory on a GPU, peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def train(settings: RunSettings, out: str | Path, *, overwrite: bool = False, resume: bool = False,
          progress: bool = True, model: Optional[QDyLoRAModel] = None,
          on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Run (or resume) training into the run directory `out`; returns the summary.

    `model` may be an already prepared model (tests, notebooks); otherwise it is loaded from
    `settings.model` (default: the embedded SmolLM2-135M-Instruct). `on_step(step)` is called
    after each optimizer step (and its checkpoint, if one is due).
    """
    out = Path(out)
    settings = with_absolute_paths(replace(settings, data=settings.data.with_embedded_default()))
    procs = distributed.from_environment()  # several processes under torchrun
    device_name = distributed.device_for(procs, settings.device)
    device = resolve_device(device_name)  # an unknown or missing device fails here, before `out` is touched
    with _Interrupts() as interrupts:
        started = distributed.start(procs, device)
        check_out_dir(out, overwrite, resume)  # before any heavy work
        distributed.barrier(procs)  # every process has checked `out` before process 0 writes to it
        try:
            with owned(out) if procs.is_main else contextlib.nullcontext():  # one training per run directory
                return _train(settings, out, overwrite, resume, progress, model, on_step, procs, device_name,
                              interrupts)
        finally:
            if started:
                distributed.stop(procs)


@dataclass
class Position:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0


@dataclass
class Job:
    """What every optimizer step needs, decided once when the run starts."""

    model: QDyLoRAModel
    forward_model: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: RankSampler
    stream: BatchStream
    settings: TrainSettings
    procs: distributed.Processes
    device: torch.device
    pad_id: int
    autocast: Callable[[], Any]
    max_steps: int

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step over all processes: micro-batch x processes x accumulation."""
        return self.settings.micro_batch_size * self.procs.world * self.settings.grad_accumulation


@dataclass
class StepResult:
    rank: Union[int, str, list[int]]  # as logged: the step's rank, "mixture", or each row's rank
    loss: float  # mean over the step's loss tokens
    grad_norm: float
    lr: float
    tokens: int
    skipped: bool = False  # a non-finite loss or gradient: no update (--skip-nonfinite)


def _train(settings: RunSettings, out: Path, overwrite: bool, resume: bool, progress: bool,
           model: Optional[QDyLoRAModel], on_step, procs: distributed.Processes,
           device_name: Optional[str], interrupts: "_Interrupts") -> dict:
    t, main = settings.train, procs.is_main
    if t.tensorboard:
        _tensorboard_writer_class()  # a missing package is reported before anything is written
    model, tokenizer, source = _load(settings, model, device_name)
    interrupts.check()
    data = load_data(replace(settings, data=fitted(settings.data, model)), tokenizer)
    interrupts.check()
    job = make_job(model, t, data.train, pad_token_id(tokenizer), procs)
    eval_ranks, val_batches = t.validation_ranks(job.sampler), fixed_batches(data.val, t.micro_batch_size)
    pos = _open_run_dir(job, out, overwrite, resume, _record(settings, job, source, data.fingerprint), data)
    log = _RunLog(out, main, t.tensorboard, resume_step=pos.step if resume else None)
    evaluate = lambda at_step, written=None: _evaluate(job, val_batches, eval_ranks, log, at_step, written)  # noqa: E731
    first_val = _first_validation(out, resume, main, evaluate)
    max_steps = job.max_steps

    model.train()
    bar = _progress(max_steps, pos.step, progress and main)
    last_val: dict[int, float] = {}
    try:
        interrupts.defer()  # a stop signal now: a checkpoint after the current step
        while pos.step < max_steps:
            # every process stops at the same step, whichever of them got the signal
            if distributed.sum_float(procs, float(interrupts.requested is not None), job.device) > 0:
                _checkpoint(job, out, pos)
                if main:
                    write_json(out / "summary.json", {"status": "interrupted", "steps": pos.step,
                                                      "val_loss_before": first_val})
                signum = interrupts.requested or signal.SIGTERM  # another process got it (torchrun)
                raise TrainingInterrupted(f"interrupted ({signal.Signals(signum).name}) after step {pos.step}; "
                                          f"checkpoint saved: continue with qdylora train --resume {out}", signum)
            start = time.perf_counter()
            result = run_step(job, pos.step, out)
            pos.step += 1
            pos.seconds += time.perf_counter() - start
            pos.tokens_seen += result.tokens
            if result.skipped:
                log.skipped(pos.step, result)
                bar.write(f"qdylora: warning: step {pos.step} skipped (loss {result.loss:.4g}, "
                          f"gradient norm {result.grad_norm:.4g})")
            if pos.step % t.log_every == 0 or pos.step == max_steps:
                log.step(pos, result, time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}", rank=result.rank if isinstance(result.rank, int)
                            else t.rank_rule, tok_s=f"{pos.tokens_seen / pos.seconds:.0f}")
            written = None  # the checkpoint's adapter file, if one is due: validation restores from it
            if pos.step == max_steps or (t.save_every and pos.step % t.save_every == 0):
                written = _checkpoint(job, out, pos)
            if pos.step == max_steps or (t.eval_every and pos.step % t.eval_every == 0):
                last_val = evaluate(pos.step, written)
                if last_val:
                    bar.write("qdylora: step %d validation loss %s" % (pos.step, ", ".join(
                        f"rank {r}: {v:.4f}" for r, v in last_val.items())))
            if on_step is not None:
                on_step(pos.step)
    finally:
        interrupts.undefer()
        bar.close()
        log.close()
        if isinstance(job.optimizer, InBackwardOptimizer):
            job.optimizer.remove_hooks()

    return _finish(job, out, pos, first_val, last_val)


def _record(settings: RunSettings, job: "Job", source: str, data_fingerprint: dict[str, str]) -> dict:
    """config.json: every setting (compute dtype resolved), the base's and the data's fingerprints,
    the version."""
    return run_record(replace(settings, model=source), job.model, data_fingerprint=data_fingerprint,
                      processes=job.procs.world,
                      global_batch=job.global_batch)


def _open_run_dir(job: "Job", out: Path, overwrite: bool, resume: bool, record: dict, data: "Datasets") -> "Position":
    """Resume from the newest intact checkpoint, or start the run directory afresh; write
    config.json and data_stats.json (process 0)."""
    if resume:
        check_resumable(out, record["base_fingerprint"], job.global_batch, job.settings.micro_batch_size,
                        record["data_fingerprint"])
        pos = _restore(job, out)
    else:
        pos = _start(out, overwrite, job)
    if job.procs.is_main:
        write_json(out / "config.json", record)
        write_json(out / "data_stats.json", {k: vars(v) for k, v in data.stats.items()})
        _announce(data, job.procs, job.settings, job.global_batch)
    return pos


def _first_validation(out: Path, resume: bool, main: bool, evaluate) -> Optional[dict]:
    """The validation loss before training: measured at step 0, or read back on resume."""
    if resume:
        summary_file = out / "summary.json"
        return read_json(summary_file).get("val_loss_before") if summary_file.exists() else None
    first_val = {str(r): v for r, v in evaluate(0).items()}
    if main:
        write_json(out / "summary.json", {"status": "running", "val_loss_before": first_val})
    return first_val


def _finish(job: "Job", out: Path, pos: "Position", first_val, last_val: dict[int, float]) -> dict:
    """summary.json; the model is left as RUN/adapter.safetensors holds it (SVD-ordered with
    --order svd), so a caller that passed its own model goes on with the saved adapter."""
    if job.settings.order == "svd":
        order_by_svd(job.model)
    summary = {
        "status": "done", "steps": pos.step, "tokens": pos.tokens_seen, "seconds": round(pos.seconds, 2),
        "tokens_per_second": round(pos.tokens_seen / pos.seconds, 2) if pos.seconds else None,
        "peak_memory_bytes": peak_memory_bytes(job.device),
        "val_loss_before": first_val,
        "val_loss_after": {str(r): v for r, v in last_val.items()},
        "adapter": str(out / "adapter.safetensors"),
    }
    write_json(out / "summary.json", summary)
    return summary


def _load(settings: RunSettings, model: Optional[QDyLoRAModel], device_name: Optional[str]):
    """The prepared model, its tokenizer and the source named in config.json. Dtype and device
    are decided here, once."""
    source = settings.model or smollm2_checkpoint()
    if model is None:
        model = prepare(source, settings.adapter, device=device_name,
                        trust_remote_code=settings.trust_remote_code)
        tokenizer = load_tokenizer(resolve_source(source), settings.trust_remote_code)
    else:
        tokenizer = load_tokenizer(resolve_source(model.base_model_name_or_path or source),
                                   settings.trust_remote_code)
    return model, tokenizer, source


def make_job(model: QDyLoRAModel, t: TrainSettings, train_rows: list[Example], pad_id: int,
             procs: distributed.Processes) -> Job:
    """Batches, optimizer (of A and B: `optimizers.make_optimizer`), schedule, DDP wrapper and
    autocast of a run."""
    config = model.qdylora_config  # compute_dtype resolved for the device
    device = next(model.parameters()).device
    forward_model = model
    if procs.distributed:  # A and B are initialised alike everywhere (seeded): no initial broadcast
        forward_model = torch.nn.parallel.DistributedDataParallel(model, init_sync=False)
    # global micro-batches of micro_batch_size x processes rows; each process takes its share
    stream = BatchStream(train_rows, t.micro_batch_size * procs.world, config.seed)
    max_steps = t.max_steps or max(1, math.ceil(t.epochs * stream.per_epoch / t.grad_accumulation))
    if t.optimizer_in_backward and procs.distributed:  # DDP averages gradients after the hooks would run
        raise QDyLoRAError("--optimizer-in-backward runs in one process: drop it under torchrun")
    optimizer = make_optimizer(t.optim, model.adapter_parameters(), t.lr, t.weight_decay, device,
                               in_backward=t.optimizer_in_backward)
    scheduler = get_scheduler(SCHEDULES[t.schedule], optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=max_steps)
    use_autocast = t.autocast == "on" or (t.autocast == "auto" and config.compute_dtype != "float32")
    if t.grad_checkpointing:
        enable = getattr(model.model, "activation_checkpointing_enable", None)  # transformers >= 5.2x's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.model.config.use_cache = False
    return Job(model, forward_model, optimizer, scheduler, t.rank_sampler(config.max_rank, config.seed),
               stream, t, procs, device, pad_id,
               lambda: autocast_context(device, config.torch_compute_dtype, use_autocast), max_steps)


def _start(out: Path, overwrite: bool, job: Job) -> Position:
    """A new run: clear what an earlier run wrote (with --overwrite), seed the dropout."""
    if overwrite and job.procs.is_main:
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    # adapter dropout draws from the global generator; each process its own masks
    torch.manual_seed(job.model.qdylora_config.seed + job.procs.rank)
    return Position()


def _restore(job: Job, out: Path) -> Position:
    """Load the newest intact checkpoint: adapter, optimizer, scheduler, RNG and position."""
    procs = job.procs
    if procs.is_main:
        remove_leftovers(out)
        checkpoint = resume_checkpoint(out)  # may set damaged checkpoints aside
    distributed.barrier(procs)
    if not procs.is_main:
        checkpoint = resume_checkpoint(out)
    state = load_state(checkpoint)
    saved_optim = state.get("optim", "adamw")  # checkpoints before --optim existed are AdamW's
    if saved_optim != job.settings.optim:
        raise QDyLoRAError(f"cannot resume {out} with --optim {job.settings.optim}: its checkpoint holds "
                           f"{saved_optim} state; resume with --optim {saved_optim}")
    if state.get("optimizer_in_backward", False) != job.settings.optimizer_in_backward:
        flag = "with" if state.get("optimizer_in_backward", False) else "without"
        raise QDyLoRAError(f"cannot resume {out} this way: its checkpoint was trained {flag} "
                           f"--optimizer-in-backward; resume {flag} it")
    load_adapter(job.model, checkpoint / "adapter.safetensors")
    job.optimizer.load_state_dict(state["optimizer"])
    job.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if job.device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], job.device)
    if procs.rank > 0:  # only process 0's generator is saved: the others draw anew
        torch.manual_seed(job.model.qdylora_config.seed + procs.rank + 1_000_003 * state["step"])
    return Position(state["step"], state["tokens_seen"], state["seconds"])


def run_step(job: Job, step: int, out: Path) -> StepResult:
    """Optimizer step `step` (0-based): every micro-batch at the ranks its rule hands out,
    gradients averaged over the step's loss tokens (and processes), clipped, then AdamW."""
    t, procs, model = job.settings, job.procs, job.model
    plans, micro = [], []
    for i in range(t.grad_accumulation):
        examples = job.stream.at(step * t.grad_accumulation + i)  # the global micro-batch
        plan = micro_batch_ranks(t.rank_rule, job.sampler, step, i, len(examples))
        plans.append(plan)
        micro.append([examples[j] for j in plan.rows])  # rows; an example repeats per rank (sandwich)
    rank = _rank_record([p.rank for p in plans])
    what = f"the rank of step {step + 1}" if isinstance(rank, int) else f"the ranks of step {step + 1}"
    distributed.check_same(procs, _fingerprint(rank), what, job.device)
    n_loss = sum(_loss_tokens(rows) for rows in micro)  # the whole step's, over every process
    step_loss = 0.0
    for i, (plan, rows) in enumerate(zip(plans, micro)):
        per_row = isinstance(plan.rank, list)
        mine, weight = distributed.shard(list(zip(rows, plan.rank if per_row else [plan.rank] * len(rows))), procs)
        set_rank(model, [r for _, r in mine] if per_row else plan.rank)
        batch = {k: v.to(job.device) for k, v in collate([e for e, _ in mine], job.pad_id).items()}  # (B, T)
        sync = i == len(micro) - 1 or not procs.distributed  # all-reduce once per step
        with contextlib.nullcontext() if sync else job.forward_model.no_sync():
            with job.autocast():
                total, _ = loss_sum(job.forward_model, batch)
            # mean over the step's loss tokens; DDP averages over processes, so x world
            (total * (weight * procs.world / max(n_loss, 1))).backward()
        step_loss += float(total.detach()) * weight
    step_loss = distributed.sum_float(procs, step_loss, job.device)
    in_backward = isinstance(job.optimizer, InBackwardOptimizer)  # the update already happened
    if in_backward:
        grad_norm = job.optimizer.grad_norm()
    else:
        params = model.adapter_parameters()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm > 0
                          else _grad_norm(params))
    lr = job.scheduler.get_last_lr()[0]
    finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
    if finite:
        job.optimizer.step()
    elif not t.skip_nonfinite:
        done = ("the finite gradients were applied in backward (--optimizer-in-backward), the last "
                "checkpoint is not touched" if in_backward else "nothing was updated and the last checkpoint is kept")
        raise QDyLoRAError(
            f"step {step + 1} ({'rank' if isinstance(rank, int) else 'ranks'} {rank}): "
            f"the loss is {step_loss:.4g} and the gradient norm "
            f"{grad_norm:.4g}: lower --lr or check the data; {done} "
            f"(--resume {out}){'' if in_backward else ', or pass --skip-nonfinite to skip such steps'}")
    job.scheduler.step()
    job.optimizer.zero_grad(set_to_none=True)
    tokens = sum(len(e) for rows in micro for e in rows)
    return StepResult(rank, step_loss / max(n_loss, 1), grad_norm, lr, tokens, skipped=not finite)


def _evaluate(job: Job, val_batches, eval_ranks: list[int], log: "_RunLog", at_step: int,
              written: Optional[Path] = None) -> dict[int, float]:
    """Validation loss at `eval_ranks` (process 0; the others wait at the next step)."""
    if not val_batches or not job.procs.is_main:
        return {}
    with _as_saved(job, written):  # the ranks as the saved adapter will have them
        losses = validation_loss(job.model, val_batches, eval_ranks, job.pad_id, job.device, job.autocast)
    log.validation(at_step, losses)
    return losses


@contextlib.contextmanager
def _as_saved(job: Job, written: Optional[Path] = None):
    """The model as RUN/adapter.safetensors holds it within the block: SVD-ordered with
    --order svd, else as trained. The trained factors come back exactly afterwards: from
    `written` (an adapter file of them, read one tensor at a time) when given, else from copies
    in memory (a second copy of the adapters, 1.8 GiB for a 30B model at rank 64)."""
    if job.settings.order != "svd" or (written is None and _adapter_is_zero(job.model)):
        yield job.model  # (a fresh adapter, B = 0, evaluates alike ordered or not: no copy needed)
        return
    if written is None:
        with svd_ordered(job.model):
            yield job.model
        return
    with safe_open(str(written), framework="pt") as f:
        with svd_ordered(job.model, lambda name: (f.get_tensor(f"{name}.lora_A"), f.get_tensor(f"{name}.lora_B"))):
            yield job.model


def _adapter_is_zero(model: QDyLoRAModel) -> bool:
    """Every B is zero (a fresh adapter): its delta is zero at every rank, SVD-ordered or not."""
    return all(not layer.lora_B.any() for layer in model.adapter_layers().values())


def _saved_adapter_writer(job: Job, extra: dict):
    """How RUN/adapter.safetensors is written: SVD-ordered with --order svd (the checkpoints keep
    the trained factors, restored from the checkpoint's file), else None (a copy of the
    checkpoint's adapter)."""
    if job.settings.order != "svd":
        return None

    def write(path: Path, written: Path) -> None:
        with _as_saved(job, written):
            save_adapter(job.model, path, extra=extra)
    return write


def _checkpoint(job: Job, out: Path, pos: Position) -> Optional[Path]:
    """checkpoints/step-N from process 0 (the others' state is the same), or a clear error; returns
    the checkpoint's adapter file (None on the other processes)."""
    if not job.procs.is_main:
        return None
    t = job.settings
    state = {
        "step": pos.step, "tokens_seen": pos.tokens_seen, "seconds": pos.seconds,
        "micro_batch_position": pos.step * t.grad_accumulation,
        "optim": t.optim, "optimizer_in_backward": t.optimizer_in_backward,
        "optimizer": job.optimizer.state_dict(), "scheduler": job.scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(job.device) if job.device.type == "cuda" else None,
    }
    extra = {"step": pos.step, "rank_range": [job.sampler.min_rank, job.sampler.max_rank]}
    try:
        final = save_checkpoint(out, pos.step, lambda p: save_adapter(job.model, p, extra=extra), state,
                                t.keep_last, write_run_adapter=_saved_adapter_writer(job, extra))
        return final / "adapter.safetensors"
    except (OSError, RuntimeError, SafetensorError) as e:
        # a full disk is ENOSPC from our own writes, but torch.save says RuntimeError ("file
        # write failed") and safetensors SafetensorError: then the free space tells
        full = (e.errno in (errno.ENOSPC, errno.EDQUOT) if isinstance(e, OSError)
                else shutil.disk_usage(out).free < 2**20)
        if not full and not isinstance(e, OSError):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:200]
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
        fix = "free space" if full else "mend that"  # a symlinked or read-only checkpoint folder is not a full disk
        raise QDyLoRAError(
            f"cannot write the step-{pos.step} checkpoint in {out}{' (disk full)' if full else ''}: {reason}{where}; "
            f"the earlier checkpoints are intact: {fix} and --resume {out}") from None


def _announce(data: Datasets, procs: distributed.Processes, t: TrainSettings, global_batch: int) -> None:
    for name, st in data.stats.items():
        log.info(f"{name} data: {st}")
    if procs.distributed:
        log.info(f"{procs.world} processes; global batch {global_batch} = micro-batch "
              f"{t.micro_batch_size} x {procs.world} processes x accumulation {t.grad_accumulation} "
              f"(learning rate {t.lr} as given, not rescaled)")


class _RunLog:
    """metrics.jsonl and TensorBoard, written by process 0 only."""

    def __init__(self, out: Path, main: bool, tensorboard: bool, resume_step: Optional[int]) -> None:
        self.metrics = MetricsLog(out / "metrics.jsonl", resume_step=resume_step) if main else None
        self.tensorboard = _tensorboard(out) if tensorboard and main else None

    def step(self, pos: Position, r: StepResult, seconds: float) -> None:
        if self.metrics is None:
            return
        self.metrics.write({"step": pos.step, "rank": r.rank, "loss": r.loss, "lr": r.lr,
                            "grad_norm": r.grad_norm, "tokens": r.tokens, "seconds": round(seconds, 4),
                            "elapsed": round(pos.seconds, 3)})
        if self.tensorboard:
            self.tensorboard.add_scalar("train/loss", r.loss, pos.step)
            if isinstance(r.rank, int):
                self.tensorboard.add_scalar("train/rank", r.rank, pos.step)
            self.tensorboard.add_scalar("train/lr", r.lr, pos.step)

    def skipped(self, step: int, r: StepResult) -> None:
        if self.metrics is not None:
            self.metrics.write({"step": step, "rank": r.rank, "skipped": "nonfinite loss or gradient"})

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


# What a user (Ctrl-C), a scheduler before preemption (SLURM, Kubernetes: SIGTERM) or a closed
# terminal (SIGHUP) sends: each asks for a checkpoint and a clean stop.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class _Interrupts:
    """What a stop signal does during `train` (in the main thread: signals are delivered there).

    Outside the training loop, Ctrl-C stops at once (KeyboardInterrupt, as without us) and is
    also remembered: Python drops an exception raised while a `__del__` runs ("Exception ignored
    in ..."), and a Ctrl-C that lands in one is lost. Measured: SIGINT 0.7 s and 1.0 s after the
    run directory appeared landed in regex's Group.__del__ while the tokenizer loaded, and the run
    trained to the end (exit 0; 2 of 11 delays). `check()` raises such a lost one again.
    In the loop (`defer()`), the first stop signal asks the loop to checkpoint and stop after the
    current step; a second acts at once (Ctrl-C: KeyboardInterrupt; SIGTERM, SIGHUP: the handler
    from before the run, by default the end of the process). A signal ignored before the run
    stays ignored (nohup: SIGHUP; a background job of a script: SIGINT).
    """

    def __init__(self) -> None:
        self.requested: Optional[int] = None  # the stop signal received
        self._before: dict[int, Any] = {}  # the handlers to restore; empty outside the main thread

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            self._before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            self._at_once()
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def check(self) -> None:
        """Raise the KeyboardInterrupt of a Ctrl-C whose first one was lost."""
        if self.requested is not None:
            raise KeyboardInterrupt

    def defer(self) -> None:
        """From now on a stop signal only sets `requested`, for the loop to act on."""
        self.check()
        for s, old in self._before.items():
            if old is not signal.SIG_IGN:
                signal.signal(s, self._stop_after_step)

    def undefer(self) -> None:
        """Back to Ctrl-C at once (after the loop, or after a first stop signal)."""
        self._restore()
        self._at_once()

    def _at_once(self) -> None:
        if self._before.get(signal.SIGINT) is signal.default_int_handler:  # not ignored, not someone else's
            signal.signal(signal.SIGINT, self._stop_now)

    def _stop_now(self, signum, frame) -> None:
        self.requested = signum
        raise KeyboardInterrupt

    def _stop_after_step(self, signum, frame) -> None:
        self.requested = signum
        self.undefer()  # the next one acts at once
        print(f"\nqdylora: {signal.Signals(signum).name}: stopping after this step to write a checkpoint "
              "(send it again to stop now)", file=sys.stderr)

    def _restore(self) -> None:
        for s, old in self._before.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


def _rank_record(ranks: list) -> Union[int, str, list[int]]:
    """The ranks of a step as logged: one int (one rank for every row), "mixture", or every
    row's rank."""
    if any(isinstance(r, RankMixture) for r in ranks):
        return "mixture"
    rows = [b for r in ranks for b in (r if isinstance(r, list) else [r])]
    return rows[0] if len(set(rows)) == 1 else rows


def _fingerprint(rank) -> int:
    """An int that differs when a step's ranks differ, to check that every process agrees."""
    if isinstance(rank, int):
        return rank
    if isinstance(rank, str):
        return -1
    return sum((i + 1) * 1_000_003 * b for i, b in enumerate(rank)) % (2**31 - 1)


def _loss_tokens(examples) -> int:
    """Tokens that carry a loss (predicted from a previous token) in a list of examples."""
    return sum(sum(1 for label in e.labels[1:] if label != IGNORE) for e in examples)


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.tensor(0.0)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True)


def _tensorboard_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise QDyLoRAError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _tensorboard(out: Path):
    return _tensorboard_writer_class()(str(out / "tensorboard"))
