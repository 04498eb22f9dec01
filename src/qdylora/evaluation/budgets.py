"""The smallest adapter under a budget, for a training run: calibrate, allocate per-layer ranks,
and keep both in the run directory.

    RUN/calibration.safetensors     G and P of every layer (`training.calibration`), tied to the
                                    adapter's tensors by their SHA-256; taken once, reused
    RUN/allocations/<name>.json     one allocation: per-layer ranks, the budget and score that
                                    chose them, its parameter count; <name> = <score>-<budget>,
                                    e.g. svd-r2 (average rank 2), loss-1.5M, output-4MB

`export`, `merge`, `generate` and `sweep` read an allocation from there by name (or any path).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

from ..core.allocation import (DEFAULT_CALIBRATION_ROWS, DEFAULT_SCORE, SCORES, Allocation, allocate,
                               allocation_from_record, allocation_record, budget_label, layer_costs, parse_budget)
from ..console import log
from ..core.model import QDyLoRAModel
from ..data.batching import pad_token_id
from ..errors import QDyLoRAError
from ..training.adapter_file import tensors_digest
from ..training.calibration import (Statistics, calibrate, calibration_batches, layer_errors, load_statistics,
                                    save_statistics)
from ..training.losses import autocast_context
from ..training.rundir import ALLOCATIONS, CALIBRATION_FILE, read_json, write_json
from ..training.settings import RunSettings

def check_score(score: str) -> None:
    if score not in SCORES:
        raise QDyLoRAError(f"unknown score {score!r}: use {', '.join(SCORES)}")


def check_calibration_rows(rows) -> None:
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise QDyLoRAError(f"calibration rows must be 0 (all) or more, got {rows!r}")


def check_svd_ordered(model: QDyLoRAModel, what: str) -> None:
    """Budgets and reorders cut an adapter whose every prefix is meant to be used unscaled."""
    if model.qdylora_config.scaling != "nested":
        raise QDyLoRAError(f"{what} need an adapter saved in SVD order (train with --order svd, the default), "
                           "where every layer's first b components are its best rank-b part")


def adapter_digest(model: QDyLoRAModel) -> str:
    return tensors_digest(model.adapter_state_dict())


def run_statistics(run_dir: Union[str, Path], model: QDyLoRAModel, tokenizer, settings: RunSettings, *,
                   rows: int = DEFAULT_CALIBRATION_ROWS, gradients: bool = True, batch_size: int = 8,
                   progress: bool = False, digest: Optional[str] = None) -> Statistics:
    """The run's calibration statistics: RUN/calibration.safetensors when it was taken on this
    adapter with the same request (rows, gradients), else measured on `rows` training rows (drawn
    with the run's seed) and saved there (the output score's request without gradients and the
    loss score's with them replace each other; the loss statistics serve both)."""
    from ..data.datasets import load_data  # the run's training rows, formatted as in training

    path = Path(run_dir) / CALIBRATION_FILE
    digest = digest or adapter_digest(model)
    request = {"rows": rows, "gradients": gradients}
    for kept in ({"rows": rows, "gradients": True}, request):  # statistics with gradients serve both scores
        stats = load_statistics(path, digest, kept, {p: layer.max_rank for p, layer in model.adapter_layers().items()})
        if stats is not None:
            return stats
    data = load_data(_with_default_data(settings).data, settings.adapter.seed, tokenizer)
    device = next(model.parameters()).device
    batches = calibration_batches(data.train, rows, settings.adapter.seed, batch_size, pad_token_id(tokenizer), device)
    dtype = model.qdylora_config.torch_compute_dtype
    from tqdm.auto import tqdm

    start = time.perf_counter()
    with tqdm(total=len(batches), desc="calibration", unit="batch", disable=not progress) as bar:
        stats = calibrate(model, batches, gradients=gradients, autocast=lambda: autocast_context(device, dtype, True),
                          on_batch=lambda: bar.update(1))
    save_statistics(path, stats, digest, request)
    log.info(f"calibration: {stats.rows} training rows, {stats.tokens} tokens, "
             f"{'forward and backward' if gradients else 'forward'} in {time.perf_counter() - start:.1f} s -> {path}")
    return stats


def _with_default_data(settings: RunSettings) -> RunSettings:
    return replace(settings, data=settings.data.with_embedded_default())


def allocation_path(run_dir: Union[str, Path], name_or_path: str) -> Path:
    """An allocation file: a path as given, or RUN/allocations/<name>.json."""
    given = Path(name_or_path)
    if given.suffix == ".json" or given.is_file():
        return given
    return Path(run_dir) / ALLOCATIONS / f"{name_or_path}.json"


def read_allocation(run_dir: Union[str, Path], name_or_path: str, layers: Sequence[str], max_rank: int) -> Allocation:
    """An allocation kept by a run (by name) or in a file, checked against the run's layers."""
    path = allocation_path(run_dir, name_or_path)
    if not path.is_file():
        kept = sorted(p.stem for p in (Path(run_dir) / ALLOCATIONS).glob("*.json"))
        hint = f" (this run keeps: {', '.join(kept)})" if kept else " (make one with --budget)"
        raise QDyLoRAError(f"no allocation {name_or_path!r}: {path} does not exist{hint}")
    return allocation_from_record(read_json(path), list(layers), max_rank, str(path))


def allocate_run(run_dir: Union[str, Path], model: QDyLoRAModel, tokenizer, settings: RunSettings, budget: str,
                 score: str = DEFAULT_SCORE, *, calibration_rows: int = DEFAULT_CALIBRATION_ROWS,
                 batch_size: int = 8, progress: bool = False) -> Allocation:
    """The allocation of `budget` under `score` for the run's adapter (loaded in `model`): read
    from RUN/allocations/<score>-<budget>.json when it was made for this adapter and calibration,
    else made and written there."""
    check_score(score)
    check_svd_ordered(model, "per-layer budgets")
    costs = layer_costs(model)
    params = parse_budget(budget, costs)
    name = f"{score}-{budget_label(budget)}"
    path = Path(run_dir) / ALLOCATIONS / f"{name}.json"
    digest = adapter_digest(model)
    calibration = {"rows": calibration_rows, "gradients": score == "loss"} if score != "svd" else None
    if path.is_file():
        record = read_json(path)
        if (isinstance(record, dict) and record.get("adapter_sha256") == digest
                and record.get("budget_params") == params and record.get("calibration") == calibration):
            allocation = allocation_from_record(record, list(costs), model.qdylora_config.max_rank, str(path))
            if allocation.params(costs) > params:  # its ranks were changed after it was made
                raise QDyLoRAError(
                    f"{path} uses {allocation.params(costs):,} adapter parameters, more than its budget {budget} "
                    f"({params:,}): it was edited after it was made. To use it as it is, pass --allocation "
                    f"{name}; to have the budget allocated again, delete it")
            log.info(f"allocation {describe(allocation, costs)}, kept in {path}")
            return allocation
    stats = None
    if score != "svd":
        stats = run_statistics(run_dir, model, tokenizer, settings, rows=calibration_rows,
                               gradients=score == "loss", batch_size=batch_size, progress=progress, digest=digest)
    errors = layer_errors(model, score, stats)
    allocation = Allocation.of(allocate(errors, costs, params), name)
    predicted = sum(float(errors[p][b]) for p, b in allocation.ranks)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, allocation_record(allocation, costs, score=score, budget=str(budget), budget_params=params,
                                       calibration=calibration, adapter_sha256=digest, predicted_error=predicted))
    log.info(f"allocation {describe(allocation, costs)}, written to {path}")
    return allocation


def describe(allocation: Allocation, costs: dict[str, int]) -> str:
    """One line: size, average rank, how many layers are off, the largest rank."""
    ranks = [b for _, b in allocation.ranks]
    return (f"{allocation.name}: {allocation.params(costs):,} adapter parameters (average rank "
            f"{allocation.mean_rank(costs):.2f}), ranks {min(ranks)}..{max(ranks)}, "
            f"{sum(b == 0 for b in ranks)} of {len(ranks)} layers off")


ORDERS = ("output", "loss")  # the data-aware orders (`core.ordering.weighted_factors`)


def reorder_run(run_dir: Union[str, Path], out: Union[str, Path], order: str, *,
                calibration_rows: int = DEFAULT_CALIBRATION_ROWS, overwrite: bool = False, device: Optional[str] = None,
                trust_remote_code: bool = False, progress: bool = False) -> Path:
    """A new run directory `out` holding the run's adapter in a data-aware `order` ("output": every
    prefix the least output error, "loss": the least K-FAC loss estimate, on calibration rows),
    instead of the SVD order: the same delta at full rank, other cuts. `run_dir` keeps its
    adapter (it gains only its calibration file); every command reads `out` as a run (its sweep,
    budgets and exports use the new order)."""
    from ..core.ordering import order_by_grams
    from ..training.adapter_file import save_adapter
    from ..training.calibration import layer_grams
    from ..training.rundir import RunDir, check_out_dir, load_run, run_record

    if order not in ORDERS:
        raise QDyLoRAError(f"unknown order {order!r}: use {', '.join(ORDERS)}")
    check_calibration_rows(calibration_rows)
    out = Path(out)
    if out.resolve() == Path(run_dir).resolve():
        raise QDyLoRAError("--out must be a new directory: the run keeps its SVD-ordered adapter")
    check_out_dir(out, overwrite, resume=False)
    model, tokenizer, settings = load_run(run_dir, device, trust_remote_code)
    check_svd_ordered(model, "data-aware orders")
    stats = run_statistics(run_dir, model, tokenizer, settings, rows=calibration_rows, gradients=order == "loss",
                           progress=progress)
    order_by_grams(model, layer_grams(model, order, stats))
    run = RunDir(out)
    run.start(overwrite)
    save_adapter(model, run.adapter,
                 extra={"order": order, "reordered_from": str(run_dir), "calibration_rows": calibration_rows})
    run.write_record(run_record(settings, model, order=order, reordered_from=str(run_dir)))
    log.info(f"{run_dir} in the {order} order ({stats.rows} calibration rows) -> {out}")
    return out


@dataclass(frozen=True)
class AllocationRequest:
    """Which per-layer ranks a command uses: an allocation the run keeps (`name`: a name such as
    output-r2, or a file), or one made for `budget` under `score` (and then kept)."""

    name: Optional[str] = None
    budget: Optional[str] = None
    score: str = DEFAULT_SCORE
    calibration_rows: int = DEFAULT_CALIBRATION_ROWS

    def __post_init__(self) -> None:
        if (self.name is None) == (self.budget is None):
            raise QDyLoRAError("give either an allocation name or a budget")
        check_score(self.score)
        if self.budget is not None:
            parse_budget(self.budget, {"layer": 1})  # a malformed budget fails before any loading
        check_calibration_rows(self.calibration_rows)

    def resolve(self, run_dir: Union[str, Path], model: QDyLoRAModel, tokenizer, settings: RunSettings, *,
                batch_size: int = 8, progress: bool = False) -> Allocation:
        if self.name is not None:
            return read_allocation(run_dir, self.name, list(model.adapter_layers()), model.qdylora_config.max_rank)
        return allocate_run(run_dir, model, tokenizer, settings, self.budget, self.score,
                            calibration_rows=self.calibration_rows, batch_size=batch_size, progress=progress)
