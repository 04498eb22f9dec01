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
import math
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from transformers import get_scheduler

from ..console import log
from ..core.devices import resolve_device
from ..core.loading import load_tokenizer, resolve_source
from ..core.memory import peak_memory_bytes
from ..core.model import QDyLoRAModel, prepare
from ..core.ordering import as_saved, order_by_svd
from ..core.rank import set_rank
from ..data.batching import BatchStream, collate, fixed_batches, pad_token_id
from ..data.embedded import smollm2_checkpoint
from ..data.datasets import Datasets, load_data, fitted
from ..data.rows import Example
from ..errors import QDyLoRAError, TrainingInterrupted
from . import distributed
from .adapter_file import load_adapter, save_adapter
from .interrupts import Interrupts
from .losses import autocast_context, gradient_norm, loss_sum, loss_tokens, validation_loss
from .optimizers import InBackwardOptimizer, make_optimizer
from .rundir import CheckpointState, RunDir, RunLog, run_record, tensorboard_writer_class
from .sampling import RankSampler, micro_batch_ranks, rank_fingerprint, step_rank_record
from .settings import RunSettings, TrainSettings

SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def train(settings: RunSettings, out: str | Path, *, overwrite: bool = False, resume: bool = False,
          progress: bool = True, model: Optional[QDyLoRAModel] = None,
          on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Run (or resume) training into the run directory `out`; returns the summary.

    `model` may be an already prepared model (tests, notebooks); otherwise it is loaded from
    `settings.model` (default: the embedded SmolLM2-135M-Instruct). `on_step(step)` is called
    after each optimizer step (and its checkpoint, if one is due).
    """
    run = RunDir(out)
    settings = replace(settings, data=settings.data.with_embedded_default()).with_absolute_paths()
    procs = distributed.from_environment()  # several processes under torchrun
    device_name = distributed.device_for(procs, settings.device)
    device = resolve_device(device_name)  # an unknown or missing device fails here, before `out` is touched
    hot = settings.step_size_warning()
    if hot and procs.is_main:
        log.warning(hot)
    with Interrupts() as interrupts:
        started = distributed.start(procs, device)
        run.check_out(overwrite, resume)  # before any heavy work
        distributed.barrier(procs)  # every process has checked `out` before process 0 writes to it
        try:
            with run.owned() if procs.is_main else contextlib.nullcontext():  # one training per run directory
                return _train(settings, run, overwrite, resume, progress, model, on_step, procs, device_name,
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


def _train(settings: RunSettings, run: RunDir, overwrite: bool, resume: bool, progress: bool,
           model: Optional[QDyLoRAModel], on_step, procs: distributed.Processes,
           device_name: Optional[str], interrupts: "Interrupts") -> dict:
    t, main = settings.train, procs.is_main
    if t.tensorboard:
        tensorboard_writer_class()  # a missing package is reported before anything is written
    model, tokenizer, source = _load(settings, model, device_name)
    interrupts.check()
    data = load_data(fitted(settings.data, model), settings.adapter.seed, tokenizer)
    interrupts.check()
    job = make_job(model, t, data.train, pad_token_id(tokenizer), procs)
    eval_ranks, val_batches = t.validation_ranks(job.sampler), fixed_batches(data.val, t.micro_batch_size)
    pos = _open_run_dir(job, run, overwrite, resume, _record(settings, job, source, data.fingerprint), data)
    log = RunLog(run, main, t.tensorboard, resume_step=pos.step if resume else None)
    evaluate = lambda at_step, written=None: _evaluate(job, val_batches, eval_ranks, log, at_step, written)  # noqa: E731
    first_val = _first_validation(run, resume, main, evaluate)
    max_steps = job.max_steps

    last_val = _resumed_validation(job, log, pos, resume, evaluate)
    model.train()
    bar = _progress(max_steps, pos.step, progress and main)
    try:
        interrupts.defer()  # a stop signal now: a checkpoint after the current step
        while pos.step < max_steps:
            _stop_if_asked(job, run, pos, interrupts, first_val)
            start = time.perf_counter()
            result = run_step(job, pos.step, run.path)
            pos.step += 1
            pos.seconds += time.perf_counter() - start
            pos.tokens_seen += result.tokens
            _report_step(job, log, bar, pos, result, time.perf_counter() - start)
            written = None  # the checkpoint's adapter file, if one is due: validation restores from it
            if pos.step == max_steps or (t.save_every and pos.step % t.save_every == 0):
                written = _checkpoint(job, run, pos)
            if _validation_due(job, pos.step):
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

    if t.order == "svd":
        order_by_svd(model)  # the model is left as RUN/adapter.safetensors holds it
        if t.gain_rows and main:
            last_val = _fit_gains(job, run, pos, data.train, val_batches, eval_ranks) or last_val
    return _finish(job, run, pos, first_val, last_val)


def _stop_if_asked(job: Job, run: RunDir, pos: "Position", interrupts: "Interrupts", first_val) -> None:
    """After a stop signal: a checkpoint, summary "interrupted", then TrainingInterrupted. Every
    process stops at the same step, whichever of them got the signal."""
    if distributed.sum_float(job.procs, float(interrupts.requested is not None), job.device) == 0:
        return
    _checkpoint(job, run, pos)
    if job.procs.is_main:
        run.interrupted(pos.step, first_val)
    signum = interrupts.requested or signal.SIGTERM  # another process got it (torchrun)
    raise TrainingInterrupted(f"interrupted ({signal.Signals(signum).name}) after step {pos.step}; "
                              f"checkpoint saved: continue with qdylora train --resume {run}", signum)


def _report_step(job: Job, log: RunLog, bar, pos: "Position", result: StepResult, seconds: float) -> None:
    """metrics.jsonl (every --log-every steps and the last), the progress bar, a skipped step's warning."""
    t = job.settings
    if result.skipped:
        log.skipped(pos.step, result.rank)
        bar.write(f"qdylora: warning: step {pos.step} skipped (loss {result.loss:.4g}, "
                  f"gradient norm {result.grad_norm:.4g})")
    if pos.step % t.log_every == 0 or pos.step == job.max_steps:
        log.step({"step": pos.step, "rank": result.rank, "loss": result.loss, "lr": result.lr,
                  "grad_norm": result.grad_norm, "tokens": result.tokens,
                  "seconds": round(seconds, 4), "elapsed": round(pos.seconds, 3)})
    bar.update(1)
    bar.set_postfix(loss=f"{result.loss:.3f}", rank=result.rank if isinstance(result.rank, int)
                    else t.rank_rule, tok_s=f"{pos.tokens_seen / pos.seconds:.0f}")


def _validation_due(job: Job, step: int) -> bool:
    """Whether the validation loss is measured after `step`: every --eval-every steps and the last."""
    return step == job.max_steps or bool(job.settings.eval_every and step % job.settings.eval_every == 0)


def _resumed_validation(job: Job, log: RunLog, pos: "Position", resume: bool, evaluate) -> dict[int, float]:
    """The validation due at the step a run resumes from: read back from metrics.jsonl, or (a
    kill between the checkpoint and its validation: 2 in 10 kills lost it, and a run killed
    there at its last step ended "done" without a final validation) measured now."""
    if not (resume and pos.step > 0 and _validation_due(job, pos.step)):
        return {}
    logged = log.resumed_validation  # None on every process but 0, which alone validates
    return logged if logged is not None else evaluate(pos.step)


def _fit_gains(job: Job, run: RunDir, pos: "Position", train_rows, val_batches, eval_ranks: list[int]) -> dict:
    """Fit the SVD-ordered adapter's rank gains on --gain-rows training rows (`gains.py`),
    rewrite RUN/adapter.safetensors with them; returns the validation loss of that adapter (the
    metrics' last validation line was taken before the gains)."""
    from .calibration import calibration_batches
    from .gains import fit_rank_gains

    batches = calibration_batches(train_rows, job.settings.gain_rows, job.model.qdylora_config.seed,
                                  job.settings.micro_batch_size, job.pad_id, job.device)
    fit = fit_rank_gains(job.model, batches, job.autocast)
    log.info(f"rank gains fitted on {fit.rows} training rows: " + ", ".join(
        f"rank {b}: {g:.2f} (loss {fit.loss_at_one[b]:.4f} -> {fit.loss[b]:.4f})" for b, g in fit.gains.items()))
    save_adapter(job.model, run.adapter, extra={**_adapter_extra(job, pos), "rank_gain_fit": fit.to_dict()})
    if not val_batches:
        return {}
    return validation_loss(job.model, val_batches, eval_ranks, job.pad_id, job.device, job.autocast)


def _record(settings: RunSettings, job: "Job", source: str, data_fingerprint: dict[str, str]) -> dict:
    """config.json: every setting (compute dtype resolved), the base's and the data's fingerprints,
    the version."""
    return run_record(replace(settings, model=source), job.model, data_fingerprint=data_fingerprint,
                      processes=job.procs.world,
                      global_batch=job.global_batch)


def _open_run_dir(job: "Job", run: RunDir, overwrite: bool, resume: bool, record: dict,
                  data: Datasets) -> "Position":
    """Resume from the newest intact checkpoint, or start the run directory afresh; write
    config.json and data_stats.json (process 0)."""
    if resume:
        run.check_resumable(record, job.global_batch)
        pos = _restore(job, run)
    else:
        if job.procs.is_main:
            run.start(overwrite)
        # adapter dropout draws from the global generator; each process its own masks
        torch.manual_seed(job.model.qdylora_config.seed + job.procs.rank)
        pos = Position()
    if job.procs.is_main:
        run.write_record(record, {k: vars(v) for k, v in data.stats.items()})
        _announce(data, job.procs, job.settings, job.global_batch)
    return pos


def _first_validation(run: RunDir, resume: bool, main: bool, evaluate) -> Optional[dict]:
    """The validation loss before training: measured at step 0, or read back on resume."""
    if resume:
        return (run.summary() or {}).get("val_loss_before")
    first_val = {str(r): v for r, v in evaluate(0).items()}
    if main:
        run.running(first_val)
    return first_val


def _finish(job: "Job", run: RunDir, pos: "Position", first_val, last_val: dict[int, float]) -> dict:
    """summary.json. The model is left as RUN/adapter.safetensors holds it (SVD-ordered with
    --order svd, with its rank gains), so a caller that passed its own model goes on with the
    saved adapter."""
    return run.finish(pos.step, pos.tokens_seen, pos.seconds, peak_memory_bytes(job.device), first_val, last_val)


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


def _restore(job: Job, run: RunDir) -> Position:
    """Load the newest intact checkpoint: adapter, optimizer, scheduler, RNG and position."""
    procs = job.procs
    if procs.is_main:
        adapter, state = run.resume_from(tidy=True)  # may set damaged checkpoints aside
    distributed.barrier(procs)
    if not procs.is_main:
        adapter, state = run.resume_from(tidy=False)
    if state.optim != job.settings.optim:
        raise QDyLoRAError(f"cannot resume {run} with --optim {job.settings.optim}: its checkpoint holds "
                           f"{state.optim} state; resume with --optim {state.optim}")
    if state.optimizer_in_backward != job.settings.optimizer_in_backward:
        flag = "with" if state.optimizer_in_backward else "without"
        raise QDyLoRAError(f"cannot resume {run} this way: its checkpoint was trained {flag} "
                           f"--optimizer-in-backward; resume {flag} it")
    load_adapter(job.model, adapter)
    job.optimizer.load_state_dict(state.optimizer)
    job.scheduler.load_state_dict(state.scheduler)
    torch.set_rng_state(state.rng_cpu)
    if job.device.type == "cuda" and state.rng_cuda is not None:
        torch.cuda.set_rng_state(state.rng_cuda, job.device)
    if procs.rank > 0:  # only process 0's generator is saved: the others draw anew
        torch.manual_seed(job.model.qdylora_config.seed + procs.rank + 1_000_003 * state.step)
    return Position(state.step, state.tokens_seen, state.seconds)


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
    rank = step_rank_record([p.rank for p in plans])
    what = f"the rank of step {step + 1}" if isinstance(rank, int) else f"the ranks of step {step + 1}"
    distributed.check_same(procs, rank_fingerprint(rank), what, job.device)
    n_loss = sum(loss_tokens(rows) for rows in micro)  # the whole step's, over every process
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
                          else gradient_norm(params))
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


def _evaluate(job: Job, val_batches, eval_ranks: list[int], log: RunLog, at_step: int,
              written: Optional[Path] = None) -> dict[int, float]:
    """Validation loss at `eval_ranks` (process 0; the others wait at the next step)."""
    if not val_batches or not job.procs.is_main:
        return {}
    with as_saved(job.model, job.settings.order, written):  # the ranks as the saved adapter will have them
        losses = validation_loss(job.model, val_batches, eval_ranks, job.pad_id, job.device, job.autocast)
    log.validation(at_step, losses)
    return losses


def _saved_adapter_writer(job: Job, extra: dict):
    """How RUN/adapter.safetensors is written: SVD-ordered with --order svd (the checkpoints keep
    the trained factors, restored from the checkpoint's file), else None (a copy of the
    checkpoint's adapter)."""
    if job.settings.order != "svd":
        return None

    def write(path: Path, written: Path) -> None:
        with as_saved(job.model, "svd", written):
            save_adapter(job.model, path, extra=extra)
    return write


def _checkpoint(job: Job, run: RunDir, pos: Position) -> Optional[Path]:
    """checkpoints/step-N from process 0 (the others' state is the same); returns the
    checkpoint's adapter file (None on the other processes)."""
    if not job.procs.is_main:
        return None
    t = job.settings
    state = CheckpointState(
        step=pos.step, tokens_seen=pos.tokens_seen, seconds=pos.seconds, optimizer=job.optimizer.state_dict(),
        scheduler=job.scheduler.state_dict(), rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state(job.device) if job.device.type == "cuda" else None,
        micro_batch_position=pos.step * t.grad_accumulation, optim=t.optim,
        optimizer_in_backward=t.optimizer_in_backward)
    extra = _adapter_extra(job, pos)
    return run.save_checkpoint(lambda p: save_adapter(job.model, p, extra=extra), state, t.keep_last,
                               write_run_adapter=_saved_adapter_writer(job, extra))


def _adapter_extra(job: Job, pos: Position) -> dict:
    """What an adapter file of the run records beside its tensors: the step and the rank range."""
    return {"step": pos.step, "rank_range": [job.sampler.min_rank, job.sampler.max_rank]}


def _announce(data: Datasets, procs: distributed.Processes, t: TrainSettings, global_batch: int) -> None:
    for name, st in data.stats.items():
        log.info(f"{name} data: {st}")
    if procs.distributed:
        log.info(f"{procs.world} processes; global batch {global_batch} = micro-batch "
              f"{t.micro_batch_size} x {procs.world} processes x accumulation {t.grad_accumulation} "
              f"(learning rate {t.lr} as given, not rescaled)")


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True)
