"""Opening a training run for an exporter: every `qdylora export` and `merge` format reads a run
the same way, checking what it can before the model loads (seconds to minutes), then loading it
once and resolving what to write: ranks, or the per-layer ranks of an allocation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

from ..core.allocation import Allocation
from ..core.model import QDyLoRAModel
from ..training.rundir import load_run, load_run_settings
from ..training.sampling import check_ranks
from ..training.settings import RunSettings

if TYPE_CHECKING:
    from ..evaluation.budgets import AllocationRequest


@dataclass
class Opened:
    """A run loaded for export: its model, tokenizer and settings, the entries to write, and what
    the output check found (e.g. the base GGUF)."""

    model: QDyLoRAModel
    tokenizer: object
    settings: RunSettings
    entries: list[Union[int, Allocation]]
    checked: Any = None


def export_targets(out: Union[str, Path], ranks: Sequence[int], one: bool, allocation, suffix: str = "") -> list[Path]:
    """Where an export writes: `out` itself for `one` rank or an allocation, else out/rank-<b><suffix>
    for each rank."""
    out = Path(out)
    return [out] if one or allocation is not None else [out / f"rank-{r}{suffix}" for r in ranks]


def open_run(run_dir: Union[str, Path], ranks: Sequence[int], allocation: Optional["AllocationRequest"],
             check_outputs: Callable[[RunSettings], Any], *, device: Optional[str] = None,
             trust_remote_code: bool = False, progress: bool = False) -> Opened:
    """Check `ranks` against the run's max rank (unless an `allocation` is asked for) and
    `check_outputs(saved settings)` (targets, base files; what it returns is kept as `checked`)
    before anything loads; then load the run and resolve the entries: `ranks`, or the one
    allocation."""
    saved, _ = load_run_settings(run_dir, trust_remote_code)
    if allocation is None:
        check_ranks(list(ranks), saved.adapter.max_rank)
    checked = check_outputs(saved)
    model, tokenizer, settings = load_run(run_dir, device, trust_remote_code)
    entries: list[Union[int, Allocation]] = list(ranks)
    if allocation is not None:
        entries = [allocation.resolve(run_dir, model, tokenizer, settings, progress=progress)]
    return Opened(model, tokenizer, settings, entries, checked)
