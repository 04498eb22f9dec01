"""Typed settings of a training run. The `qdylora train` flags are generated from these fields
(and their one-line docstrings); a run directory's config.json holds them all."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Literal, Optional

from ..core.config import QDyLoRAConfig, from_dict
from ..core.fields import AT_LEAST_ONE, NOT_NEGATIVE, POSITIVE, check_fields
from ..core.scaling import scale
from ..data.settings import DataSettings
from ..errors import QDyLoRAError
from .sampling import RankSampler, check_ranks, parse_ranks

ORDERS = ("svd", "none")  # TrainSettings.order; svd is qdylora.core.ordering


# s(R) x lr above which the rank study's rank-64 runs on Qwen2.5-0.5B (ASDiv) trained worse than a
# PEFT QLoRA run of rank 64 at the same lr: 3.5e-4 (s = 0.71, lr 5e-4) and 1e-3 (s = 2, lr 5e-4);
# at 1.25e-4 and below (s = alpha / 64 = 0.25, PEFT's own) they matched it (docs/rank-study.md).
HOT_STEP = 3e-4


@dataclass
class TrainSettings:
    """The optimisation: steps, batches, learning rate, rank sampling, evaluation, checkpoints."""

    max_steps: Annotated[Optional[int], AT_LEAST_ONE] = None
    """Optimizer steps (default: --epochs passes over the training examples)."""

    epochs: Annotated[float, POSITIVE] = 1.0
    """Passes over the training data when --max-steps is not given."""

    micro_batch_size: Annotated[int, AT_LEAST_ONE] = 4
    """Examples per forward/backward pass."""

    grad_accumulation: Annotated[int, AT_LEAST_ONE] = 4
    """Micro-batches per optimizer step (one rank for all of them)."""

    lr: Annotated[float, POSITIVE] = 2e-4
    """Peak learning rate of AdamW (QLoRA's 2e-4)."""

    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warmup (QLoRA: constant)."""

    warmup_steps: Annotated[int, NOT_NEGATIVE] = 0
    """Steps of linear warmup from 0 to --lr."""

    weight_decay: Annotated[float, NOT_NEGATIVE] = 0.0
    """AdamW weight decay on A and B."""

    optim: Literal["adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit"] = "adamw"
    """Optimizer of A and B: adamw (torch), adamw-8bit (bitsandbytes: both moments in 8 bits, about a quarter of the state), paged-adamw / paged-adamw-8bit (bitsandbytes' paged state in CUDA unified memory, as QLoRA; the non-paged one on a CPU)."""

    max_grad_norm: Annotated[float, NOT_NEGATIVE] = 0.3
    """Gradients are clipped to this global norm (QLoRA's 0.3); 0 = no clipping."""

    optimizer_in_backward: bool = False
    """Step each A and B the moment its gradient is complete during backward, then free that gradient, so the gradients of all adapters are never held at once (saves 4 bytes per adapter parameter: 1.8 GiB at rank 64 on a 30B model). Needs --grad-accumulation 1 and --max-grad-norm 0 (no global norm exists before the updates), one process, and no --skip-nonfinite."""

    rank_rule: Literal["full", "step", "example", "sandwich", "mixture"] = "full"
    """How ranks are trained: full (every example at the largest rank, plain LoRA; the lower ranks come from --order svd: the default, best in docs/rank-study.md), step (one rank b ~ p_B per optimizer step, the DyLoRA / QDyLoRA papers' rule), example (each example of a micro-batch its own rank: the smallest, the largest and stratified draws from p_B, in one forward), sandwich (each example at the largest, the smallest and one drawn rank: 3x the compute), mixture (one forward of the adapter averaged over p_B)."""

    order: Literal["svd", "none"] = "svd"
    """How the saved adapter's components are ordered: svd (the default: each layer's delta rewritten through its SVD, so rank b is the best rank-b approximation of the trained adapter, used unscaled: scale rule "nested"; validation runs on it too; checkpoints keep the trained factors), none (as trained: rank b is the trained B[:, :b] A[:b] at s(b); the papers' meaning)."""

    gain_rows: Annotated[int, NOT_NEGATIVE] = 32
    """With --order svd: training rows (drawn with the seed) on which one gain per rank is fitted after the last step: rank b's components are multiplied by g(b) (at 1, 2, 4, ... below the largest rank; the ranks between interpolated), so that a cut adapter makes up for the components it leaves out (docs/rank-study.md; the gains are saved in the adapter and go into every export); 0 = no gains."""

    rank_distribution: Literal["uniform", "log-uniform"] = "uniform"
    """p_B over [min_rank, max_rank]: uniform, or log-uniform (p(b) proportional to 1/b: as much weight on 1-8 as on 8-64)."""

    min_rank: Annotated[int, AT_LEAST_ONE] = 1
    """Smallest rank sampled; rank b is drawn uniformly from [min_rank, max_rank] each step. min_rank == max_rank is plain QLoRA at that rank."""

    ranks: Optional[str] = None
    """Explicit ranks to sample instead, e.g. "1,2,4,8,16,32,64" or "1-8,16"."""

    rank_weights: Optional[str] = None
    """Sampling weights for --ranks, comma separated (default: equal)."""

    eval_every: Annotated[int, NOT_NEGATIVE] = 100
    """Validation loss every this many steps (also before the first and after the last); 0 = only before and after."""

    eval_ranks: Optional[str] = None
    """Ranks the validation loss is measured at (default: smallest, a middle power of two, largest)."""

    save_every: Annotated[int, NOT_NEGATIVE] = 100
    """Checkpoint every this many steps (and at the end); 0 = only at the end."""

    keep_last: Annotated[int, AT_LEAST_ONE] = 2
    """Checkpoints kept in RUN/checkpoints (older ones are removed)."""

    log_every: Annotated[int, AT_LEAST_ONE] = 1
    """Write a metrics line every this many steps."""

    grad_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    autocast: Literal["auto", "on", "off"] = "auto"
    """Autocast the rest of the model to the compute dtype (auto: on unless the compute dtype is float32)."""

    tensorboard: bool = False
    """Also write TensorBoard events to RUN/tensorboard (needs the tensorboard package)."""

    skip_nonfinite: bool = False
    """Skip (and log) an optimizer step whose loss or gradient norm is NaN or infinite; default: stop with an error at that step, keeping the last checkpoint."""

    def __post_init__(self) -> None:
        check_fields(self)  # types, choices, finiteness and bounds (core/fields.py)
        self._check_ranks()

        if self.optimizer_in_backward:
            clash = [flag for flag, bad in (("--grad-accumulation > 1", self.grad_accumulation > 1),
                                            ("--max-grad-norm > 0", self.max_grad_norm > 0),
                                            ("--skip-nonfinite", self.skip_nonfinite)) if bad]
            if clash:
                raise QDyLoRAError(
                    f"--optimizer-in-backward updates each parameter during backward, which rules out "
                    f"{' and '.join(clash)}: add --grad-accumulation 1 --max-grad-norm 0 (and no --skip-nonfinite)")

    def _check_ranks(self) -> None:
        """The rank lists and weights parse, and the weights are finite, not negative, not all 0
        (checked here, before a run starts or an old one is replaced)."""
        if self.ranks is not None:
            parse_ranks(self.ranks)
        if self.eval_ranks is not None:
            parse_ranks(self.eval_ranks)
        if self.rank_weights is not None:
            if self.ranks is None:
                raise QDyLoRAError("rank_weights needs --ranks")
            weights = self.weights()
            if not all(math.isfinite(w) and w >= 0 for w in weights) or not sum(weights) > 0:
                raise QDyLoRAError(f"rank_weights must be finite numbers, not negative and not all 0, "
                                   f"got {self.rank_weights!r}")

    def weights(self) -> Optional[tuple[float, ...]]:
        """--rank-weights as numbers (None: equal weights)."""
        if self.rank_weights is None:
            return None
        try:
            return tuple(float(w) for w in self.rank_weights.split(","))
        except ValueError:
            raise QDyLoRAError(f"rank_weights must be numbers, got {self.rank_weights!r}") from None

    def rank_sampler(self, max_rank: int, seed: int) -> RankSampler:
        """p_B for a model whose adapters have `max_rank` components."""
        if self.ranks is not None:
            ranks = tuple(parse_ranks(self.ranks))
            return RankSampler(max_rank, min_rank=min(ranks), ranks=ranks, weights=self.weights(), seed=seed,
                               distribution=self.rank_distribution)
        return RankSampler(max_rank, min_rank=self.min_rank, seed=seed, distribution=self.rank_distribution)

    def validation_ranks(self, sampler: RankSampler) -> list[int]:
        """Ranks for the periodic validation loss (each checked against max_rank)."""
        if self.eval_ranks is not None:
            ranks = parse_ranks(self.eval_ranks)
            check_ranks(ranks, sampler.max_rank, what="eval_ranks entry")
            return ranks
        support = sampler.support
        lo, hi = support[0], support[-1]
        middle = 1 << round((lo * hi) ** 0.5).bit_length() - 1  # power of two near the geometric mean
        middle = min(max(middle, lo), hi)
        return sorted({lo, middle, hi})


@dataclass
class RunSettings:
    """Everything a training run depends on; saved as RUN/config.json."""

    model: Optional[str] = None
    """Base model (directory, .gguf file or hub id); None = the embedded SmolLM2-135M-Instruct."""

    device: Optional[str] = None
    """cpu, cuda, cuda:1 (default: cuda if available, else cpu)."""

    trust_remote_code: bool = False
    """Allow model code from the checkpoint (only for models you trust)."""

    adapter: QDyLoRAConfig = field(default_factory=QDyLoRAConfig)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self) -> None:
        check_fields(self)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["adapter"] = self.adapter.to_dict()
        return out

    def step_size_warning(self) -> Optional[str]:
        """A line when the scale at the largest rank is above PEFT's own (alpha / R) and s(R) x lr,
        the step of B under Adam, is above what trained as well as QLoRA in docs/rank-study.md,
        else None. (PEFT's own scale is never warned about: it is what a QLoRA run of rank R does.)"""
        a = self.adapter
        s = scale(a.alpha, a.max_rank, a.scaling, a.max_rank)
        step = s * self.train.lr
        if s <= a.alpha / a.max_rank * (1 + 1e-9) or step <= HOT_STEP:
            return None
        times = s * a.max_rank / a.alpha
        return (f"--scaling {a.scaling} gives rank {a.max_rank} a step (scale x lr = {step:.2g}) {times:.3g} "
                f"times a PEFT QLoRA run's; above {HOT_STEP:g} the rank study's rank-64 runs on Qwen2.5-0.5B trained "
                "worse than QLoRA at every rank (docs/rank-study.md): use --scaling standard (the default) or a lower --lr")

    def with_absolute_paths(self) -> "RunSettings":
        """The model and data paths that exist here made absolute, so the run's config.json names
        them from any working directory (a relative `--model tiny/llama` read from elsewhere was
        taken for a hub id)."""
        def absolute(value: Optional[str]) -> Optional[str]:
            return os.path.abspath(value) if value and os.path.exists(value) else value

        data = replace(self.data, data=absolute(self.data.data), val_data=absolute(self.data.val_data))
        return replace(self, model=absolute(self.model), data=data)

    @classmethod
    def from_dict(cls, d: dict, where: str = "settings") -> "RunSettings":
        """From `to_dict()`'s nested form; unknown keys are errors."""
        d = dict(d)
        groups = {"adapter": QDyLoRAConfig, "data": DataSettings, "train": TrainSettings}
        for key, group in groups.items():
            if key in d:
                d[key] = from_dict(group, d[key], f"{where} [{key}]")
        return from_dict(cls, d, where)
