"""Fitting the rank gains: a shrunk adapter gets gains that undo the shrinking and lower the
loss; `qdylora train` fits them after an SVD-ordered run and saves them with the adapter."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from qdylora.core.gains import rank_gains
from qdylora.core.ordering import order_by_svd
from qdylora.data.batching import fixed_batches
from qdylora.data.rows import RowFormat, tokenize
from qdylora.training.adapter_file import read_adapter_metadata
from qdylora.training.gains import GRID, fit_rank_gains, fitted_ranks
from qdylora.training.losses import losses_at_ranks, padded
from qdylora.training.rundir import load_run, read_json
from qdylora.training.trainer import train

from ..conftest import tiny_settings, write_sums

SUMS = RowFormat("template", "{question}", "{answer}")


def test_fitted_ranks_are_the_powers_of_two_below_the_largest():
    assert fitted_ranks(64) == [1, 2, 4, 8, 16, 32]
    assert fitted_ranks(8) == [1, 2, 4] and fitted_ranks(12) == [1, 2, 4, 8] and fitted_ranks(1) == []


def test_gains_undo_a_shrunk_adapter(trained_run):
    """Every B halved: the fitted gains grow by about 2 (within the grid's steps of sqrt 2) and
    the calibration loss at each fitted rank is below its loss at g = 1."""
    model, tok, s = load_run(trained_run)
    order_by_svd(model)  # (drops the run's own gains)
    rows = [json.loads(x) for x in open(s.data.data).read().splitlines()[:16]]
    examples, _ = tokenize(rows, tok, SUMS)
    batches = list(padded(fixed_batches(examples, 8), tok.pad_token_id, torch.device("cpu")))
    before = fit_rank_gains(model, batches, contextlib.nullcontext)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.mul_(0.5)
    fit = fit_rank_gains(model, batches, contextlib.nullcontext)
    assert set(fit.gains) == set(fitted_ranks(8)) and 1.0 in GRID
    for b, g in fit.gains.items():
        assert fit.loss[b] < fit.loss_at_one[b]  # the gain helped on the rows it was fitted on
        assert 1.41 <= g / before.gains[b] <= 2.83 or g == max(GRID), (b, g, before.gains[b])
    table = rank_gains(model)
    assert (table[0], table[1], table[3]) == (fit.gains[1], fit.gains[2], fit.gains[4])
    model.eval()
    after = losses_at_ranks(model, fixed_batches(examples, 8), [1], tok.pad_token_id, torch.device("cpu"))
    assert after[1][0] / after[1][1] == pytest.approx(fit.loss[1], rel=1e-5)  # the model keeps the fitted gain


def test_train_fits_and_saves_the_gains(tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    out = tmp_path / "run"
    summary = train(tiny_settings(tiny_lm, data, max_steps=6, gain_rows=16), out, progress=False)
    meta = read_adapter_metadata(out / "adapter.safetensors")
    fit = meta["extra"]["rank_gain_fit"]
    assert fit["rows"] == 16 and set(fit) == {"rows", "1", "2", "4"}
    assert len(meta["rank_gains"]) == 8 and meta["rank_gains"][7] == 1.0
    assert meta["rank_gains"][0] == fit["1"]["gain"] or abs(meta["rank_gains"][0] - fit["1"]["gain"]) < 1e-3
    model, _, _ = load_run(out)
    assert rank_gains(model) == meta["rank_gains"]
    assert read_json(out / "summary.json")["val_loss_after"] == summary["val_loss_after"]
    none = train(tiny_settings(tiny_lm, data, max_steps=2, gain_rows=0), tmp_path / "none", progress=False)
    assert "rank_gains" not in read_adapter_metadata(tmp_path / "none" / "adapter.safetensors")
    assert none["status"] == "done"
