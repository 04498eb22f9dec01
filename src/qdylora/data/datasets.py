"""A run's data, ready to train on: its rows read, split into training and validation rows,
tokenized, counted and fingerprinted (`load_data`), with lengths fitted to the model (`fitted`).

    DataSettings -> rows.run_rows (read, split) -> rows.tokenize_row (counted, fingerprinted)
                 -> Datasets(train, val: TokenizedRows, stats, fingerprint)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch

from ..console import log
from ..core.context import context_length, fit_lengths
from ..errors import QDyLoRAError
from .rows import DataStats, Fingerprint, RowFormat, TokenizedRows, row_format, run_rows, tokenize_row
from .settings import DataSettings


@dataclass
class Datasets:
    train: TokenizedRows
    val: TokenizedRows
    stats: dict[str, DataStats]  # {"train", "validation"}: rows kept, truncated, dropped
    fingerprint: dict[str, str]  # {"train", "validation"}: `rows_fingerprint` of the rows read


def load_data(data: DataSettings, seed: int, tokenizer) -> Datasets:
    """Read, split (seeded by `seed`) and tokenize the training and validation rows, with clear
    errors. Memory grows by 12 bytes a row (`TokenizedRows`); the rows stay in Arrow."""
    rows, train_idx, val_rows, val_idx = run_rows(data, seed)
    if not rows:
        raise QDyLoRAError(f"the training data {data.data} is empty")
    rf = row_format(data, rows[0].keys(), data.data)
    if tokenizer.eos_token_id is None and not rf.is_chat:
        log.warning("the tokenizer has no end-of-sequence token: responses are trained without one, so the "
                    "model does not learn to stop (generation ends at --max-new-tokens); set the tokenizer's "
                    "eos_token in its tokenizer_config.json to train it")
    opts = dict(max_source_length=data.max_source_length, max_target_length=data.max_target_length,
                train_on_prompt=data.train_on_prompt)
    train, train_stats, train_print = _prepare(rows, train_idx, tokenizer, rf, opts)
    val, val_stats, val_print = _prepare(val_rows, val_idx, tokenizer, rf, opts)
    if not len(train):
        raise QDyLoRAError(
            f"no training example is left after tokenization ({train_stats}): check the format, "
            "the templates and --max-source-length / --max-target-length"
        )
    return Datasets(train, val, {"train": train_stats, "validation": val_stats},
                    {"train": train_print, "validation": val_print})


def _prepare(rows: Sequence[dict], numbers: np.ndarray, tokenizer, rf: RowFormat,
             opts: dict) -> tuple[TokenizedRows, DataStats, str]:
    """One pass over the rows numbered `numbers` (sorted): each is tokenized once, to count it
    and its tokens, and fingerprinted; only the numbers and lengths of the kept rows stay."""
    stats, fingerprint = DataStats(rows=len(numbers)), Fingerprint()
    kept, lengths = np.empty(len(numbers), dtype=np.int64), np.empty(len(numbers), dtype=np.int32)
    n = 0
    for number, row in _selected(rows, numbers):
        fingerprint.add(row)
        example = tokenize_row(row, number, tokenizer, rf, stats, **opts)  # numbers in errors: the file's own
        if example is not None:
            kept[n], lengths[n] = number, len(example)
            n += 1
    return TokenizedRows(rows, kept[:n].copy(), lengths[:n].copy(), tokenizer, rf, opts), stats, fingerprint.hexdigest()


def _selected(rows: Sequence[dict], numbers: np.ndarray) -> Iterator[tuple[int, dict]]:
    """(number, row) for the sorted row `numbers`: read in one sequential pass when they are
    most of the rows (Arrow reads in batches), one by one when they are few (a validation split)."""
    if len(numbers) * 16 < len(rows):
        yield from ((int(i), rows[int(i)]) for i in numbers)
        return
    wanted = np.zeros(len(rows), dtype=bool)
    wanted[numbers] = True
    yield from ((number, row) for number, row in enumerate(rows) if wanted[number])


def fitted(data: DataSettings, model: torch.nn.Module) -> DataSettings:
    """`data` with its lengths cut to the positions the model reads (`fit_lengths`, which says so)."""
    source, target = fit_lengths(data.max_source_length, data.max_target_length, context_length(model))
    return replace(data, max_source_length=source, max_target_length=target)
