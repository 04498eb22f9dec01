"""Calibration statistics G = E[(A x)(A x)^T] and P = sum (B^T g)(B^T g)^T against brute force."""

from __future__ import annotations

import pytest
import torch

import qdylora
from qdylora import QDyLoRAError
from qdylora.core.allocation import allocate, layer_costs, tail_errors
from qdylora.data.rows import IGNORE
from qdylora.training.calibration import (calibrate, layer_errors, load_statistics, save_statistics)
from qdylora.training.losses import loss_sum

from ..conftest import VOCAB, adapted_model


def rows(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n unpadded rows of different lengths, loss on their second half."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = 6 + 3 * i
        ids = torch.randint(0, VOCAB, (1, T), generator=g)
        labels = ids.clone()
        labels[:, : T // 2] = IGNORE
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def padded_batch(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rows padded on the right into one batch (pad id 0, mask 0, label IGNORE)."""
    T = max(r["input_ids"].shape[1] for r in batch)
    def pad(t, value):
        return torch.cat([t, t.new_full((1, T - t.shape[1]), value)], dim=1)
    return {"input_ids": torch.cat([pad(r["input_ids"], 0) for r in batch]),
            "attention_mask": torch.cat([pad(r["attention_mask"], 0) for r in batch]),
            "labels": torch.cat([pad(r["labels"], IGNORE) for r in batch])}


def brute_force(model, batches, path):
    """G and P of one layer: its inputs captured, its output's gradient through a zero probe."""
    layer = model.adapter_layers()[path]
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    R = A.shape[0]
    G, P, tokens = torch.zeros(R, R, dtype=torch.float64), torch.zeros(R, R, dtype=torch.float64), 0
    labelled = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    for batch in batches:
        seen = {}

        def probe(module, inputs, output):
            seen["x"] = inputs[0].detach()
            seen["probe"] = torch.zeros_like(output, requires_grad=True)
            return output + seen["probe"]

        handle = layer.register_forward_hook(probe)
        with qdylora.at_rank(model, R):
            total, _ = loss_sum(model, batch)
        handle.remove()
        (g,) = torch.autograd.grad(total / labelled, seen["probe"])
        real = batch["attention_mask"].bool()  # (n, T)
        q = seen["x"].double()[real] @ A.T  # (tokens, R)
        p = g.double()[real] @ B  # (tokens, R)
        G += q.T @ q
        P += p.T @ p
        tokens += int(real.sum())
    return G / tokens, P


def test_statistics_match_brute_force_and_ignore_padding(tiny_dir):
    model = adapted_model(tiny_dir("llama"), "nested")
    data = rows()
    one_by_one = [padded_batch([r]) for r in data]
    two_batches = [padded_batch(data[:2]), padded_batch(data[2:])]  # padded rows
    model.train()
    before_rank = qdylora.get_rank(model)
    stats = calibrate(model, two_batches)
    assert model.training and qdylora.get_rank(model) == before_rank  # put back
    assert all(p.grad is None for p in model.adapter_parameters())  # no gradient left behind
    assert stats.rows == 4 and stats.tokens == sum(int(r["attention_mask"].sum()) for r in data)
    path = "model.layers.1.self_attn.v_proj"
    G, P = brute_force(model.eval(), one_by_one, path)
    assert G.abs().max() > 0 and P.abs().max() > 0
    torch.testing.assert_close(stats.G[path], G, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(stats.P[path], P, rtol=1e-4, atol=1e-12)
    without = calibrate(model, two_batches, gradients=False)
    assert not without.has_gradients
    torch.testing.assert_close(without.G[path], stats.G[path], rtol=1e-6, atol=1e-10)


def test_scores_rank_layers_differently_and_files_round_trip(tiny_dir, tmp_path):
    model = adapted_model(tiny_dir("llama"), "nested")
    stats = calibrate(model, [padded_batch(rows())])
    errors = {score: layer_errors(model, score, stats) for score in ("svd", "output", "loss")}
    for score, by_layer in errors.items():
        for e in by_layer.values():
            assert e.shape == (9,) and e[-1] == 0 and torch.all(e[:-1] >= -1e-9)
    layer = model.adapter_layers()["model.layers.0.mlp.up_proj"]
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    c = 16 / 8**0.5
    torch.testing.assert_close(errors["svd"]["model.layers.0.mlp.up_proj"][3],
                               (c * B[:, 3:] @ A[3:]).pow(2).sum(), rtol=1e-10, atol=0)
    costs = layer_costs(model)
    budget = 2 * sum(costs.values())
    chosen = {s: allocate(errors[s], costs, budget) for s in errors}
    assert chosen["output"] != chosen["svd"] or chosen["loss"] != chosen["svd"]  # the data changes the choice
    save_statistics(tmp_path / "c.safetensors", stats, "abc", {"rows": 4})
    layers = {p: layer.max_rank for p, layer in model.adapter_layers().items()}
    back = load_statistics(tmp_path / "c.safetensors", "abc", {"rows": 4}, layers)
    assert back.rows == stats.rows and all(torch.equal(back.P[p], stats.P[p]) for p in stats.P)
    assert load_statistics(tmp_path / "c.safetensors", "other", {"rows": 4}, layers) is None  # another adapter
    assert load_statistics(tmp_path / "c.safetensors", "abc", {"rows": 8}, layers) is None  # another request
    assert tail_errors(stats.P["model.layers.0.mlp.up_proj"], stats.G["model.layers.0.mlp.up_proj"], c)[0] > 0


def test_tampered_statistics_are_one_line(tmp_path):
    """A tampered calibration.safetensors (wrong shape, other layers: three tracebacks; NaN,
    negative statistics: used silently, NaN written into JSON) is refused in one line."""
    import dataclasses

    from qdylora.training.calibration import Statistics

    layers = {"a": 4, "b": 4}
    def eye(n=4):  # a fresh tensor each time: safetensors refuses tensors that share memory
        return torch.eye(n, dtype=torch.float64)

    good = Statistics({"a": eye(), "b": eye()}, {"a": eye(), "b": eye()}, rows=4, tokens=20)
    bad = {
        "wrong shape": dataclasses.replace(good, G={"a": eye(3), "b": eye()}),
        "other layers": dataclasses.replace(good, G={"a": eye()}, P={"a": eye()}),
        "NaN": dataclasses.replace(good, P={"a": eye() * float("nan"), "b": eye()}),
        "negative": dataclasses.replace(good, G={"a": -eye(), "b": eye()}),
        "P for some layers": dataclasses.replace(good, P={"a": eye()}),
    }
    path = tmp_path / "c.safetensors"
    save_statistics(path, good, "abc", {"rows": 4})
    assert load_statistics(path, "abc", {"rows": 4}, layers).rows == 4
    for what, stats in bad.items():
        save_statistics(path, stats, "abc", {"rows": 4})
        with pytest.raises(QDyLoRAError, match="calibration file .* is damaged .*delete it to calibrate again"):
            load_statistics(path, "abc", {"rows": 4}, layers)
