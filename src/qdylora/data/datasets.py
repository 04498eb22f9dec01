"""A run's data, ready to train on: its rows read, split into training and validation rows,
tokenized, counted and fingerprinted (`load_data`), with lengths fitted to the model (`fitted`).

    DataSettings -> rows.run_rows (read, split) -> rows.tokenize -> Datasets(train, val, stats, fingerprint)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..core.context import context_length, fit_lengths
from ..errors import QDyLoRAError
from .rows import DataStats, Example, row_format, rows_fingerprint, run_rows, tokenize
from .settings import DataSettings


@dataclass
class Datasets:
    train: list[Example]
    val: list[Example]
    stats: dict[str, DataStats]  # {"train", "validation"}: rows kept, truncated, dropped
    fingerprint: dict[str, str]  # {"train", "validation"}: `rows_fingerprint` of the rows read


def load_data(data: DataSettings, seed: int, tokenizer) -> Datasets:
    """Read, split (seeded by `seed`) and tokenize the training and validation rows, with clear errors."""
    rows, train_idx, val_rows, val_idx = run_rows(data, seed)
    if not rows:
        raise QDyLoRAError(f"the training data {data.data} is empty")
    rf = row_format(data, rows[0].keys(), data.data)
    opts = dict(max_source_length=data.max_source_length, max_target_length=data.max_target_length,
                train_on_prompt=data.train_on_prompt)
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


def fitted(data: DataSettings, model: torch.nn.Module) -> DataSettings:
    """`data` with its lengths cut to the positions the model reads (`fit_lengths`, which says so)."""
    source, target = fit_lengths(data.max_source_length, data.max_target_length, context_length(model))
    return replace(data, max_source_length=source, max_target_length=target)
