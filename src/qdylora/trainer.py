"""The training loop: one run trains the adapter at every rank.

Each optimizer step draws one rank b from p_B (`RankSampler`, a pure function of seed and step)
and runs all its micro-batches with the truncated pair B[:, :b] A[:b] scaled by s(b). Only A
and B are trained (AdamW); the NF4 base is frozen.
"""

from __future__ import annotations

import contextlib
import errno
import math
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from transformers import get_scheduler

from . import __version__
from .adapter_file import base_fingerprint, load_adapter, save_adapter
from .batching import BatchStream, collate, fixed_batches, pad_token_id
from .data import IGNORE, DataStats, Example, tokenize
from . import distributed
from .devices import default_device
from .embedded import smollm2_checkpoint
from .errors import QDyLoRAError
from .loading import load_tokenizer, resolve_source
from .losses import autocast_context, loss_sum, validation_loss
from .model import QDyLoRAModel, prepare
from .rank import set_rank
from .rundir import (MetricsLog, check_out_dir, check_version, clear_run, load_state, read_json,
                     remove_leftovers, resume_checkpoint, save_checkpoint, write_json)
from .sampling import micro_batch_ranks
from .scaling import RankMixture
from .settings import RunSettings

SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass
class Datasets:
    train: list[Example]
    val: list[Example]
    stats: dict[str, DataStats]


def load_data(settings: RunSettings, tokenizer) -> Datasets:
    """Read, split and tokenize the training (and validation) rows, with clear errors."""
    d = settings.data
    rows, train_idx, val_rows, val_idx = d.split_rows(settings.adapter.seed)
    if not rows:
        raise QDyLoRAError(f"the training data {d.data} is empty")
    rf = d.row_format(rows[0].keys(), d.data)
    opts = dict(max_source_length=d.max_source_length, max_target_length=d.max_target_length,
                train_on_prompt=d.train_on_prompt)
    train, train_stats = _tokenize_subset(rows, train_idx, tokenizer, rf, opts)
    val, val_stats = _tokenize_subset(val_rows, val_idx, tokenizer, rf, opts)
    if not train:
        raise QDyLoRAError(
            f"no training example is left after tokenization ({train_stats}): check the format, "
            "the templates and --max-source-length / --max-target-length"
        )
    return Datasets(train, val, {"train": train_stats, "validation": val_stats})


def _tokenize_subset(rows, indices, tokenizer, rf, opts):
    # row numbers in errors are the file's own
    return tokenize([rows[i] for i in indices], tokenizer, rf, row_numbers=indices, **opts)


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
    settings = replace(settings, data=settings.data.with_embedded_default())
    t = settings.train
    procs = distributed.from_environment()  # several processes under torchrun
    device_name = distributed.device_for(procs, settings.device)
    started = distributed.start(procs, torch.device(device_name) if device_name else default_device())
    check_out_dir(out, overwrite, resume)  # before any heavy work
    distributed.barrier(procs)  # every process has checked `out` before process 0 writes to it
    try:
        return _train(settings, out, overwrite, resume, progress, model, on_step, procs, device_name)
    finally:
        if started:
            distributed.stop(procs)


def _train(settings: RunSettings, out: Path, overwrite: bool, resume: bool, progress: bool,
           model: Optional[QDyLoRAModel], on_step, procs: distributed.Processes,
           device_name: Optional[str]) -> dict:
    t = settings.train
    main = procs.is_main
    if t.tensorboard:
        _tensorboard_writer_class()  # a missing package is reported before anything is written
    source = settings.model or smollm2_checkpoint()

    # Model and tokenizer. Dtype and device are decided here, once.
    if model is None:
        model = prepare(source, settings.adapter, device=device_name,
                        trust_remote_code=settings.trust_remote_code)
        tokenizer = load_tokenizer(resolve_source(source), settings.trust_remote_code)
    else:
        tokenizer = load_tokenizer(resolve_source(model.base_model_name_or_path or source),
                                   settings.trust_remote_code)
    config = model.config  # compute_dtype resolved for the device
    device = next(model.parameters()).device
    sampler = t.rank_sampler(config.max_rank, config.seed)
    eval_ranks = t.validation_ranks(sampler)
    fingerprint = base_fingerprint(model)

    data = load_data(settings, tokenizer)
    pad_id = pad_token_id(tokenizer)
    # global micro-batches of micro_batch_size x processes rows; each process takes its share
    stream = BatchStream(data.train, t.micro_batch_size * procs.world, config.seed)
    max_steps = t.max_steps or max(1, math.ceil(t.epochs * stream.per_epoch / t.grad_accumulation))
    val_batches = fixed_batches(data.val, t.micro_batch_size)

    params = model.adapter_parameters()
    forward_model = model
    if procs.distributed:  # A and B are initialised alike everywhere (seeded): no initial broadcast
        forward_model = torch.nn.parallel.DistributedDataParallel(model, init_sync=False)
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = get_scheduler(SCHEDULES[t.schedule], optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=max_steps)
    use_autocast = t.autocast == "on" or (t.autocast == "auto" and config.compute_dtype != "float32")
    autocast = lambda: autocast_context(device, config.torch_compute_dtype, use_autocast)  # noqa: E731
    if t.grad_checkpointing:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.model.config.use_cache = False

    global_batch = t.micro_batch_size * procs.world * t.grad_accumulation
    record = {"qdylora_version": __version__, "base_fingerprint": fingerprint,
              "processes": procs.world, "global_batch": global_batch,
              "settings": {**settings.to_dict(), "model": source, "adapter": config.to_dict()}}
    step, tokens_seen, elapsed = 0, 0, 0.0
    if resume:
        saved = read_json(out / "config.json")
        check_version(saved, out)
        if saved.get("base_fingerprint") != fingerprint:
            raise QDyLoRAError(f"cannot resume {out}: it was trained on another base model "
                               f"({saved['settings'].get('model')})")
        if saved.get("global_batch", global_batch) != global_batch:
            raise QDyLoRAError(
                f"cannot resume {out} with a global batch of {global_batch} (micro-batch x processes x "
                f"accumulation); it was trained with {saved['global_batch']}: keep that product, e.g. "
                f"{saved.get('processes', 1)} processes x micro-batch {t.micro_batch_size}")
        if main:
            remove_leftovers(out)
            checkpoint = resume_checkpoint(out)  # may set damaged checkpoints aside
        distributed.barrier(procs)
        if not main:
            checkpoint = resume_checkpoint(out)
        state = load_state(checkpoint)
        load_adapter(model, checkpoint / "adapter.safetensors")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, tokens_seen, elapsed = state["step"], state["tokens_seen"], state["seconds"]
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        if procs.rank > 0:  # only process 0's generator is saved: the others draw anew
            torch.manual_seed(config.seed + procs.rank + 1_000_003 * step)
    else:
        if overwrite and main:
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        # adapter dropout draws from the global generator; each process its own masks
        torch.manual_seed(config.seed + procs.rank)
    if main:
        write_json(out / "config.json", record)
        write_json(out / "data_stats.json", {k: vars(v) for k, v in data.stats.items()})
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if resume else None) if main else _NoLog()
    tensorboard = _tensorboard(out) if t.tensorboard and main else None
    if main:
        for name, st in data.stats.items():
            print(f"qdylora: {name} data: {st}")
        if procs.distributed:
            print(f"qdylora: {procs.world} processes; global batch {global_batch} = micro-batch "
                  f"{t.micro_batch_size} x {procs.world} processes x accumulation {t.grad_accumulation} "
                  f"(learning rate {t.lr} as given, not rescaled)")

    def evaluate(at_step: int) -> dict[int, float]:
        if not val_batches or not main:  # process 0 validates; the others wait at the next step
            return {}
        losses = validation_loss(model, val_batches, eval_ranks, pad_id, device, autocast)
        metrics.write({"step": at_step, "val_loss": {str(r): v for r, v in losses.items()}})
        if tensorboard:
            for r, v in losses.items():
                tensorboard.add_scalar(f"val_loss/rank_{r}", v, at_step)
        return losses

    def checkpoint(at_step: int) -> None:
        if not main:  # process 0 writes; the others' state is the same
            return
        state = {
            "step": at_step, "tokens_seen": tokens_seen, "seconds": elapsed,
            "micro_batch_position": at_step * t.grad_accumulation,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }
        extra = {"step": at_step, "rank_range": [sampler.min_rank, sampler.max_rank]}
        try:
            save_checkpoint(out, at_step, lambda p: save_adapter(model, p, extra=extra), state, t.keep_last)
        except OSError as e:
            full = " (disk full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise QDyLoRAError(
                f"cannot write the step-{at_step} checkpoint in {out}{full}: {e.strerror or e}; "
                f"the earlier checkpoints are intact: free space and --resume {out}") from None

    first_val = read_json(out / "summary.json").get("val_loss_before") if resume and (out / "summary.json").exists() else None
    if not resume:
        first_val = {str(r): v for r, v in evaluate(0).items()}
        if main:
            write_json(out / "summary.json", {"status": "running", "val_loss_before": first_val})

    model.train()
    bar = _progress(max_steps, step, progress and main)
    last_val: dict[int, float] = {}
    interrupt = _InterruptFlag()
    try:
        while step < max_steps:
            # every process stops at the same step, whichever of them saw the Ctrl-C
            if distributed.sum_float(procs, float(interrupt.requested), device) > 0:
                checkpoint(step)
                if main:
                    write_json(out / "summary.json", {"status": "interrupted", "steps": step,
                                                      "val_loss_before": first_val})
                raise TrainingInterrupted(
                    f"interrupted after step {step}; checkpoint saved: continue with "
                    f"qdylora train --resume {out}")
            start = time.perf_counter()
            plans, micro = [], []
            for i in range(t.grad_accumulation):
                examples = stream.at(step * t.grad_accumulation + i)  # global micro-batch
                plan = micro_batch_ranks(t.rank_rule, sampler, step, i, len(examples))
                plans.append(plan)
                micro.append([examples[j] for j in plan.rows])  # rows, repeated for sandwich
            rank = _rank_record([p.rank for p in plans])
            distributed.check_same(procs, _fingerprint(rank), f"the ranks of step {step + 1}", device)
            n_loss = sum(_loss_tokens(m) for m in micro)  # the whole step's, over every process
            step_tokens = sum(len(e) for m in micro for e in m)
            step_loss = 0.0
            for i, (plan, rows) in enumerate(zip(plans, micro)):
                ranks = plan.rank if isinstance(plan.rank, list) else [plan.rank] * len(rows)
                mine, weight = distributed.shard(list(zip(rows, ranks)), procs)  # this process's rows
                examples = [e for e, _ in mine]
                set_rank(model, [r for _, r in mine] if isinstance(plan.rank, list) else plan.rank)
                batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}  # (B, T) each
                sync = i == len(micro) - 1 or not procs.distributed  # all-reduce once per step
                with contextlib.nullcontext() if sync else forward_model.no_sync():
                    with autocast():
                        total, _ = loss_sum(forward_model, batch)
                    # mean over the step's loss tokens; DDP averages over processes, so x world
                    (total * (weight * procs.world / max(n_loss, 1))).backward()
                step_loss += float(total.detach()) * weight
            step_loss = distributed.sum_float(procs, step_loss, device)
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
                         if t.max_grad_norm > 0 else _grad_norm(params))
            lr = scheduler.get_last_lr()[0]
            finite = math.isfinite(step_loss) and math.isfinite(float(grad_norm))
            if not finite and not t.skip_nonfinite:
                raise QDyLoRAError(
                    f"step {step + 1} (rank {rank}): the loss is {step_loss:.4g} and the gradient norm "
                    f"{float(grad_norm):.4g}: lower --lr or check the data; nothing was updated and the "
                    f"last checkpoint is kept (--resume {out}), or pass --skip-nonfinite to skip such steps")
            if finite:
                optimizer.step()
            else:
                metrics.write({"step": step + 1, "rank": rank, "skipped": "nonfinite loss or gradient"})
                bar.write(f"qdylora: warning: step {step + 1} skipped (loss {step_loss:.4g}, "
                          f"gradient norm {float(grad_norm):.4g})")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - start
            elapsed += seconds
            tokens_seen += step_tokens
            loss = step_loss / max(n_loss, 1)
            if step % t.log_every == 0 or step == max_steps:
                metrics.write({"step": step, "rank": rank, "loss": loss, "lr": lr,
                               "grad_norm": float(grad_norm), "tokens": step_tokens,
                               "seconds": round(seconds, 4), "elapsed": round(elapsed, 3)})
                if tensorboard:
                    tensorboard.add_scalar("train/loss", loss, step)
                    if isinstance(rank, int):
                        tensorboard.add_scalar("train/rank", rank, step)
                    tensorboard.add_scalar("train/lr", lr, step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", rank=rank if isinstance(rank, int) else t.rank_rule,
                            tok_s=f"{tokens_seen / elapsed:.0f}")
            if step == max_steps or (t.eval_every and step % t.eval_every == 0):
                last_val = evaluate(step)
                if last_val:
                    bar.write("qdylora: step %d validation loss %s" % (step, ", ".join(
                        f"rank {r}: {v:.4f}" for r, v in last_val.items())))
            if step == max_steps or (t.save_every and step % t.save_every == 0):
                checkpoint(step)
            if on_step is not None:
                on_step(step)
    finally:
        interrupt.restore()
        bar.close()
        metrics.close()
        if tensorboard:
            tensorboard.close()

    summary = {
        "status": "done", "steps": step, "tokens": tokens_seen, "seconds": round(elapsed, 2),
        "tokens_per_second": round(tokens_seen / elapsed, 2) if elapsed else None,
        "peak_memory_bytes": peak_memory_bytes(device),
        "val_loss_before": first_val,
        "val_loss_after": {str(r): v for r, v in last_val.items()},
        "adapter": str(out / "adapter.safetensors"),
    }
    write_json(out / "summary.json", summary)
    return summary


class TrainingInterrupted(QDyLoRAError):
    """Ctrl-C during training: a checkpoint was written and the run can be resumed."""


class _InterruptFlag:
    """The first Ctrl-C (SIGINT) asks the loop to checkpoint and stop after the current step;
    a second one interrupts at once. Only in the main thread (signals are delivered there)."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._old or signal.default_int_handler)
        print("\nqdylora: stopping after this step to write a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr)

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def _rank_record(ranks: list) -> Union[int, str, list[int]]:
    """The ranks of a step as logged: one int (step rule), "mixture", or every row's rank."""
    if all(isinstance(r, int) for r in ranks) and len(set(ranks)) == 1:
        return ranks[0]
    if any(isinstance(r, RankMixture) for r in ranks):
        return "mixture"
    return [b for r in ranks for b in (r if isinstance(r, list) else [r])]


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


class _NoLog:
    """The metrics log of processes other than 0: writes nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


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
