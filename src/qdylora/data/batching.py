"""Batches: a seeded, length-grouped order per epoch, and padding into tensors.

The order of epoch e is a pure function of (seed, e), so the micro-batch at any position of
the stream is known from the position alone: resuming needs only the step number.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .rows import IGNORE, Example

MEGABATCH = 50  # batches per sorting group, as transformers' LengthGroupedSampler


def epoch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                group_by_length: bool = True) -> list[list[int]]:
    """Indices of each batch of one epoch.

    With grouping, a seeded permutation is cut into groups of `MEGABATCH` batches, each group is
    sorted by length (longest first) and cut into batches, and the batch order is shuffled: batches
    hold similar lengths (little padding) but the order stays random. The last batch may be short.
    """
    n = len(lengths)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if group_by_length:
        size = batch_size * MEGABATCH
        perm = [i for start in range(0, n, size)
                for i in sorted(perm[start:start + size], key=lambda i: -lengths[i])]
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if group_by_length:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
    return batches


class BatchStream:
    """Micro-batches of examples, epoch after epoch, addressable by position."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int) -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.lengths = [len(e) for e in examples]
        self.per_epoch = math.ceil(len(examples) / batch_size)
        self._cache: tuple[int, list[list[int]]] | None = None

    def at(self, position: int) -> list[Example]:
        """The micro-batch at `position` (0-based, across epochs)."""
        epoch, index = divmod(position, self.per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, epoch_order(self.lengths, self.batch_size, self.seed, epoch))
        return [self.examples[i] for i in self._cache[1][index]]


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id, or its EOS id when it has none (padding is masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels`, each (batch, longest)."""
    longest = max(len(e) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        labels[row, : len(e)] = torch.tensor(e.labels)
        mask[row, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fixed_batches(examples: Sequence[Example], batch_size: int) -> list[list[Example]]:
    """Batches for evaluation: sorted by length (least padding), no shuffling."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    return [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
