"""set_rank / at_rank / get_rank: validation and restoring."""

from __future__ import annotations

import pytest
import torch

import qdylora
from qdylora import QDyLoRAConfig, QDyLoRAError


@pytest.fixture(scope="module")
def model(tiny_dir):
    return qdylora.prepare(tiny_dir("llama"), QDyLoRAConfig(max_rank=8))


def ranks_of(model):
    return [layer.rank for layer in model.adapter_layers().values()]


def test_starts_at_max_rank(tiny_dir):
    assert qdylora.get_rank(qdylora.prepare(tiny_dir("llama"), QDyLoRAConfig(max_rank=8))) == 8


def test_set_rank_reaches_every_layer(model):
    qdylora.set_rank(model, 3)
    assert ranks_of(model) == [3] * 14
    qdylora.set_rank(model.model, 5)  # works on the wrapped transformers model too
    assert ranks_of(model) == [5] * 14


def test_at_rank_restores_even_after_an_error(model):
    qdylora.set_rank(model, 2)
    with pytest.raises(RuntimeError):
        with qdylora.at_rank(model, 7):
            assert qdylora.get_rank(model) == 7
            raise RuntimeError("boom")
    assert qdylora.get_rank(model) == 2
    with qdylora.at_rank(model, [1, 8]):
        assert torch.equal(qdylora.get_rank(model), torch.tensor([1, 8]))
    assert qdylora.get_rank(model) == 2


@pytest.mark.parametrize("bad", [-1, 9, 100, [1, 9], [-2, 3]])
def test_out_of_range(model, bad):
    with pytest.raises(QDyLoRAError, match=r"out of range: use 1\.\.8"):
        qdylora.set_rank(model, bad)


@pytest.mark.parametrize("bad", [True, 2.5, [[1, 2]], torch.tensor([1.0, 2.0])])
def test_wrong_type(model, bad):
    with pytest.raises(QDyLoRAError):
        qdylora.set_rank(model, bad)


def test_per_example_ranks_must_match_the_batch(model):
    with qdylora.at_rank(model, [1, 2, 3]), pytest.raises(ValueError, match="3 entries"):
        with torch.no_grad():
            model(input_ids=torch.zeros(2, 5, dtype=torch.long))


def test_model_without_adapters():
    with pytest.raises(QDyLoRAError, match="prepare"):
        qdylora.set_rank(torch.nn.Linear(2, 2), 1)


def test_bad_update_mode(model):
    with pytest.raises(QDyLoRAError, match="full"):
        qdylora.set_update_mode(model, "partial")


def test_an_allocation_sets_each_layer_and_at_rank_restores_them(model):
    from qdylora.core.allocation import Allocation

    paths = list(model.adapter_layers())
    allocation = Allocation.of({p: i % 9 for i, p in enumerate(paths)}, "mixed")
    qdylora.set_rank(model, 4)
    with qdylora.at_rank(model, allocation):
        assert ranks_of(model) == [i % 9 for i in range(14)]
    assert ranks_of(model) == [4] * 14
    qdylora.set_rank(model.model, allocation)  # the wrapped transformers model: the same paths
    assert ranks_of(model) == [i % 9 for i in range(14)]
    with pytest.raises(QDyLoRAError, match="other layers"):
        qdylora.set_rank(model, Allocation.of({p: 1 for p in paths[:-1]}))
    with pytest.raises(QDyLoRAError, match="out of range"):
        qdylora.set_rank(model, Allocation.of({p: 9 for p in paths}))


def test_allocations_batched_with_ranks_equal_each_alone(tiny_dir):
    """One forward of [rank 2, allocation, rank 0] rows (each layer its own per-row ranks) gives
    what each gives alone."""
    from qdylora.core.allocation import Allocation
    from qdylora.core.rank import replicate_for_ranks

    from ..conftest import VOCAB, adapted_model

    m = adapted_model(tiny_dir("llama"), "nested")
    allocation = Allocation.of({p: (5 * i) % 9 for i, p in enumerate(m.adapter_layers())}, "mixed")
    x = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    entries = [2, allocation, 0]
    with torch.no_grad():
        alone = []
        for e in entries:
            with qdylora.at_rank(m, e):
                alone.append(m(input_ids=x).logits)
        (stacked,) = replicate_for_ranks(m, entries, x)
        together = m(input_ids=stacked).logits
    assert (alone[1] - alone[0]).abs().max() > 1e-2 and (alone[1] - alone[2]).abs().max() > 1e-2
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
