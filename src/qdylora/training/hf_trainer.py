"""QDyLoRA inside Hugging Face's `Trainer` and TRL's `SFTTrainer` (built on it): a callback that
draws the rank of every optimizer step from the sampler `qdylora train` uses, and the run
directory our commands read, written from a trained model.

    model = qdylora.prepare("HuggingFaceTB/SmolLM2-135M-Instruct", QDyLoRAConfig(max_rank=64))
    ranks = QDyLoRACallback(model, rank_rule="full")          # the default recipe of `qdylora train`
    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=..., callbacks=[ranks])
    trainer.train()
    save_run(model, "runs/sft", data=DataSettings(...))      # then: qdylora sweep runs/sft ...

The rank of step t is a pure function of (seed, t), as in `qdylora train`, so a resumed Trainer
and every process of a distributed one draw the same ranks. What a callback cannot do: the
per-example rules (`example`, `sandwich`) need a rank per row of each micro-batch and, for
sandwich, three copies of it; the Trainer builds its batches where no callback sees them.
Use `qdylora train` for those.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from transformers import TrainerCallback

from ..console import log
from ..core.model import QDyLoRAModel
from ..core.ordering import as_saved, order_by_svd
from ..core.rank import evaluating, set_rank
from ..errors import QDyLoRAError
from .adapter_file import save_adapter
from .losses import batch_losses_at_ranks
from .rundir import RunDir, is_run_dir, run_record
from .sampling import micro_batch_ranks
from ..data.settings import DataSettings
from .settings import RunSettings, TrainSettings

CALLBACK_RULES = ("full", "step", "mixture")


class QDyLoRACallback(TrainerCallback):
    """Sets the rank of each optimizer step of a `Trainer` that trains a `QDyLoRAModel`.

    rank_rule: "full" (every step at max_rank; with order="svd" the lower ranks come from the SVD
    ordering done when training ends: `qdylora train`'s default), "step" (one rank b ~ p_B per
    optimizer step, for all its micro-batches: the papers' rule), "mixture" (the adapter averaged
    over p_B). p_B: rank_distribution, min_rank, ranks, rank_weights as `qdylora train` takes them;
    seed defaults to the model's. eval_ranks: at each evaluation, the loss on the Trainer's
    evaluation batches at these ranks is added to its metrics as eval_loss_rank_<b>.
    """

    def __init__(self, model: QDyLoRAModel, *, rank_rule: str = "full", order: str = "svd",
                 rank_distribution: str = "uniform", min_rank: int = 1, ranks: Optional[str] = None,
                 rank_weights: Optional[str] = None, seed: Optional[int] = None,
                 eval_ranks: Sequence[int] = ()) -> None:
        if rank_rule not in CALLBACK_RULES:
            raise QDyLoRAError(f"rank_rule {rank_rule!r} cannot run inside a Trainer (it needs a rank per row "
                               f"of each batch): use one of {', '.join(CALLBACK_RULES)}, or qdylora train")
        self.model = model
        self.settings = TrainSettings(rank_rule=rank_rule, order=order, rank_distribution=rank_distribution,
                                      min_rank=min_rank, ranks=ranks, rank_weights=rank_weights)
        config = model.qdylora_config
        self.sampler = self.settings.rank_sampler(config.max_rank, config.seed if seed is None else seed)
        self.eval_ranks = list(eval_ranks)
        self.drawn: dict[int, object] = {}  # optimizer step (0-based) -> its rank

    def on_step_begin(self, args, state, control, **kwargs):
        """Before the first micro-batch of optimizer step `state.global_step` (0-based)."""
        plan = micro_batch_ranks(self.settings.rank_rule, self.sampler, state.global_step, 0, 1)
        set_rank(self.model, plan.rank)
        self.drawn[state.global_step] = plan.rank if isinstance(plan.rank, int) else "mixture"

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The rank of the step just logged, in the Trainer's log history (trainer_state.json)."""
        step = state.global_step - 1
        if state.log_history and step in self.drawn and "loss" in state.log_history[-1]:
            state.log_history[-1]["rank"] = self.drawn[step]

    def on_evaluate(self, args, state, control, metrics=None, eval_dataloader=None, **kwargs):
        if not self.eval_ranks or metrics is None or eval_dataloader is None:
            return
        with self._as_saved():
            losses = rank_losses(self.model, eval_dataloader, self.eval_ranks)
        metrics.update({f"eval_loss_rank_{r}": loss for r, loss in losses.items()})
        if state.log_history and "eval_loss" in state.log_history[-1]:
            state.log_history[-1].update({f"eval_loss_rank_{r}": loss for r, loss in losses.items()})

    def on_train_end(self, args, state, control, **kwargs):
        """The model as `qdylora train` saves it: SVD-ordered (order "svd"), at max_rank."""
        if self.settings.order == "svd":
            order_by_svd(self.model)
        set_rank(self.model, self.model.qdylora_config.max_rank)

    def _as_saved(self):
        """The model as it will be saved, while the block runs (SVD-ordered with order "svd")."""
        return as_saved(self.model, self.settings.order)


@torch.no_grad()
def rank_losses(model: QDyLoRAModel, batches: Iterable[dict], ranks: Sequence[int]) -> dict[int, float]:
    """Mean token loss at each rank on a Trainer's batches (dicts of input_ids, attention_mask,
    labels with -100 where there is no loss), all ranks in the same forward passes."""
    device = next(model.parameters()).device
    with evaluating(model):
        sums = batch_losses_at_ranks(model, ({k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
                                             for batch in batches), list(ranks))
    return {r: float(s.sum() / max(int(c.sum()), 1)) for r, (s, c) in sums.items()}


def save_run(model: QDyLoRAModel, out: str | Path, *, data: Optional[DataSettings] = None,
             train: Optional[TrainSettings] = None, overwrite: bool = False) -> Path:
    """Write `model` as a run directory our commands read (config.json + adapter.safetensors):
    `qdylora sweep`, `export`, `merge` and `generate` then work on it as on a `qdylora train` run.
    `data` says how rows were formatted in training (the sweep formats evaluation rows alike)."""
    out = Path(out)
    source = model.base_model_name_or_path
    if not source:
        raise QDyLoRAError("the model was prepared from a module, not a path or hub id: our commands reload "
                           "the base from there; prepare it from its path")
    if out.exists() and any(out.iterdir()) and not (overwrite and is_run_dir(out)):
        raise QDyLoRAError(f"{out} is not empty: choose a new directory"
                           + (" (or --overwrite a run)" if is_run_dir(out) else ""))
    out.mkdir(parents=True, exist_ok=True)
    settings = RunSettings(model=source, data=data or DataSettings(), train=train or TrainSettings())
    run = RunDir(out)
    save_adapter(model, run.adapter, extra={"rank_range": [1, model.qdylora_config.max_rank]})
    run.write_record(run_record(settings, model, written_by="qdylora.save_run"))
    log.info(f"wrote {out}: qdylora sweep / export / merge / generate read it")
    return out


__all__ = ["QDyLoRACallback", "rank_losses", "save_run"]
