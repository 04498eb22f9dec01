"""Length-grouped, seeded batch order and padding."""

from __future__ import annotations

import random

import torch

from qdylora.data.batching import BatchStream, collate, epoch_order, fixed_batches
from qdylora.data.rows import IGNORE, Example


def lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.randint(5, 300) for _ in range(n)]


def padding(batches, lens):
    return sum(len(b) * max(lens[i] for i in b) - sum(lens[i] for i in b) for b in batches)


def test_every_example_once_per_epoch():
    lens = lengths(103)
    for group in (True, False):
        batches = epoch_order(lens, 8, seed=0, epoch=0, group_by_length=group)
        assert sorted(i for b in batches for i in b) == list(range(103))
        assert all(len(b) <= 8 for b in batches)


def test_order_is_a_function_of_seed_and_epoch():
    lens = lengths()
    assert epoch_order(lens, 8, 0, 0) == epoch_order(lens, 8, 0, 0)
    assert epoch_order(lens, 8, 0, 0) != epoch_order(lens, 8, 0, 1)
    assert epoch_order(lens, 8, 0, 0) != epoch_order(lens, 8, 1, 0)


def test_grouping_cuts_padding():
    lens = lengths()
    grouped = padding(epoch_order(lens, 8, 0, 0, group_by_length=True), lens)
    plain = padding(epoch_order(lens, 8, 0, 0, group_by_length=False), lens)
    assert grouped < plain / 5


def test_stream_crosses_epochs():
    examples = [Example([i] * (i + 1), [i] * (i + 1)) for i in range(10)]
    stream = BatchStream(examples, batch_size=4, seed=0)
    assert stream.per_epoch == 3
    first = [stream.at(p) for p in range(3)]
    assert sorted(e.input_ids[0] for b in first for e in b) == list(range(10))
    again = BatchStream(examples, batch_size=4, seed=0)
    assert [again.at(p) for p in (4, 0)] == [stream.at(4), stream.at(0)]


def test_collate_pads_right_and_masks_labels():
    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["input_ids"].dtype == torch.long


def test_fixed_batches_cover_everything_sorted():
    examples = [Example([1] * n, [1] * n) for n in (3, 9, 1, 5, 7)]
    batches = fixed_batches(examples, 2)
    assert [[len(e) for e in b] for b in batches] == [[9, 7], [5, 3], [1]]
