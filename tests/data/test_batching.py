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


def list_epoch_order(lengths, batch_size, seed, epoch, group_by_length=True):
    """The order as lists of Python ints (the code before `EpochOrder`): runs started then
    resume on the same batches."""
    n = len(lengths)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if group_by_length:
        size = batch_size * 50
        perm = [i for start in range(0, n, size) for i in sorted(perm[start:start + size], key=lambda i: -lengths[i])]
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if group_by_length:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def test_order_equals_the_list_reference():
    for n, batch_size in ((1000, 8), (1003, 8), (7, 8), (2501, 3), (1, 1)):
        lens = [v % 17 for v in lengths(n)]  # many ties: their order must match too
        for group in (True, False):
            assert list(epoch_order(lens, batch_size, 2, 1, group)) == list_epoch_order(lens, batch_size, 2, 1, group)


def test_fixed_batches_sort_longest_first_ties_in_order():
    examples = [Example([0] * n, [0] * n) for n in (3, 5, 3, 1, 5)]
    batches = fixed_batches(examples, 2)
    ids = [[id(e) for e in b] for b in batches]
    assert ids == [[id(examples[1]), id(examples[4])], [id(examples[0]), id(examples[2])], [id(examples[3])]]


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
