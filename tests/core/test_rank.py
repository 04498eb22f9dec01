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
