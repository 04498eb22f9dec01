"""Batches: a seeded, length-grouped order per epoch, and padding into tensors.

The order of epoch e is a pure function of (seed, e), so the micro-batch at any position of
the stream is known from the position alone: resuming needs only the step number.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from .rows import IGNORE, Example, example_lengths

MEGABATCH = 50  # batches per sorting group, as transformers' LengthGroupedSampler


def epoch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                group_by_length: bool = True) -> "EpochOrder":
    """The batches of one epoch.

    With grouping, a seeded permutation is cut into groups of `MEGABATCH` batches, each group is
    sorted by length (longest first, ties in permutation order) and cut into batches, and the
    batch order is shuffled: batches hold similar lengths (little padding) but the order stays
    random. The last batch may be short.
    """
    lengths = np.asarray(lengths)
    n = len(lengths)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).numpy()  # (n,)
    if group_by_length:  # stable sort by (group, -length): np.lexsort sorts by its last key first
        perm = perm[np.lexsort((-lengths[perm], np.arange(n) // (batch_size * MEGABATCH)))]
    starts = np.arange(0, n, batch_size)  # (batches,) where each batch begins in perm
    if not group_by_length:
        return EpochOrder(perm, np.append(starts, n))
    sizes = np.diff(np.append(starts, n))  # (batches,) all batch_size but the last
    shuffled = torch.randperm(len(starts), generator=g).numpy()  # new position -> old batch
    new_sizes = sizes[shuffled]
    new_starts = np.concatenate(([0], np.cumsum(new_sizes)))
    # position p of the new order, in new batch k at offset p - new_starts[k], reads perm at
    # starts[shuffled[k]] + that offset
    source = np.repeat(starts[shuffled] - new_starts[:-1], new_sizes) + np.arange(n)
    return EpochOrder(perm[source], new_starts)


class EpochOrder:
    """One epoch's batches as two arrays, not lists of Python ints (36 bytes an index: 360 MB at
    10 M rows): `order` (n,) row indices batch after batch, `starts` (batches + 1,) where each
    batch begins. Indexing gives a batch as a list."""

    def __init__(self, order: np.ndarray, starts: np.ndarray) -> None:
        self.order, self.starts = order, starts

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, j: int) -> list[int]:
        if not -len(self) <= j < len(self):
            raise IndexError(f"batch {j} of {len(self)}")
        j %= len(self)
        return self.order[self.starts[j]:self.starts[j + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[j] for j in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, EpochOrder) and np.array_equal(self.order, other.order)
                and np.array_equal(self.starts, other.starts))


class BatchStream:
    """Micro-batches of examples, epoch after epoch, addressable by position."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int) -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.lengths = example_lengths(examples)
        self.per_epoch = math.ceil(len(examples) / batch_size)
        self._cache: tuple[int, EpochOrder] | None = None

    def at(self, position: int) -> list[Example]:
        """The micro-batch at `position` (0-based, across epochs)."""
        epoch, index = divmod(position, self.per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, epoch_order(self.lengths, self.batch_size, self.seed, epoch))
        return [self.examples[i] for i in self._cache[1][index]]


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id, or its EOS id when it has none, or 0 when it has neither:
    padding is masked out of attention and loss, so any id serves."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


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
    order = np.argsort(-example_lengths(examples), kind="stable").tolist()  # longest first, ties in order
    return [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
