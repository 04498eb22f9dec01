"""The optimizers of A and B: torch's AdamW and bitsandbytes' 8-bit and paged AdamW."""

from __future__ import annotations

import dataclasses
import json

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from qdylora.core.config import QDyLoRAConfig
from qdylora.errors import QDyLoRAError
from qdylora.training.optimizers import make_optimizer, state_bytes
from qdylora.training.rundir import checkpoint_dirs, load_state
from qdylora.training.settings import TrainSettings
from qdylora.training.trainer import train

from ..conftest import tiny_settings, write_sums
from .test_trainer import stopped_at_4_then_resumed


def test_each_name_gives_its_optimizer_and_paged_ones_fall_back_on_a_cpu(caplog):
    params = [torch.nn.Parameter(torch.randn(64, 4096))]
    cpu = torch.device("cpu")
    assert type(make_optimizer("adamw", params, 1e-3, 0.0, cpu)) is torch.optim.AdamW
    assert type(make_optimizer("adamw-8bit", params, 1e-3, 0.0, cpu)) is bnb.optim.AdamW8bit
    with caplog.at_level("WARNING", logger="qdylora"):
        assert type(make_optimizer("paged-adamw-8bit", params, 1e-3, 0.0, cpu)) is bnb.optim.AdamW8bit
        assert type(make_optimizer("paged-adamw", params, 1e-3, 0.0, cpu)) is torch.optim.AdamW
    assert "paged optimizer state lives in CUDA unified memory; on cpu the non-paged adamw-8bit is used" in caplog.text
    with pytest.raises(QDyLoRAError, match="optim must be one of"):
        make_optimizer("sgd", params, 1e-3, 0.0, cpu)


def test_8bit_state_is_a_quarter_of_adamws_and_steps_alike():
    """Both moments as uint8 codes plus one float32 absmax per 256 values (~2.03 bytes per
    parameter against AdamW's 8); one step moves the weights as AdamW does, to 8-bit precision."""
    torch.manual_seed(0)
    init, grad = torch.randn(64, 4096), torch.randn(64, 4096)
    moved = {}
    for name in ("adamw", "adamw-8bit"):
        p = torch.nn.Parameter(init.clone())
        opt = make_optimizer(name, [p], 1e-2, 0.0, torch.device("cpu"))
        for _ in range(3):
            p.grad = grad.clone()
            opt.step()
        moved[name] = (p.detach() - init, state_bytes(opt))
    (d32, b32), (d8, b8) = moved["adamw"], moved["adamw-8bit"]
    assert 0 <= b32 - 2 * 4 * init.numel() < 64 and b8 < 0.27 * b32  # (+ its step counter)
    # 8-bit codes: close on average, a few values near zero further off
    assert (d8 - d32).abs().mean() < 0.02 * d32.abs().mean() and torch.equal(d8.sign(), d32.sign())


def eight_bit_settings(tiny_lm, data, **opts):
    """A run whose every adapter tensor has 4,096 values (max_rank 64 on the tiny model's 64-wide
    q and o projections): large enough for bitsandbytes to keep its state in 8 bits."""
    s = tiny_settings(tiny_lm, data, optim="adamw-8bit", **opts)
    return dataclasses.replace(s, adapter=dataclasses.replace(s.adapter, max_rank=64,
                                                              target_modules=["q_proj", "o_proj"]))


def test_an_8bit_run_trains_and_resumes_exactly(tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    opts = dict(max_steps=6, save_every=2)
    full = tmp_path / "full"
    summary = train(eight_bit_settings(tiny_lm, data, **opts), full, progress=False)
    assert summary["val_loss_after"]["64"] < summary["val_loss_before"]["64"]  # it learns
    state = load_state(checkpoint_dirs(full)[-1])
    assert state["optim"] == "adamw-8bit"
    quant = [s["__bnb_optimizer_quant_state__"] for s in state["optimizer"]["state"].values()]
    assert quant and all(q["state1"].dtype == torch.uint8 and q["state2"].dtype == torch.uint8 for q in quant)
    stopped_at_4_then_resumed(eight_bit_settings(tiny_lm, data, **opts), tmp_path / "part")
    a, b = load_file(full / "adapter.safetensors"), load_file(tmp_path / "part" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_optimizer_is_refused(tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    run = tmp_path / "run"
    train(tiny_settings(tiny_lm, data, max_steps=2, save_every=1), run, progress=False)
    with pytest.raises(QDyLoRAError, match="holds adamw state; resume with --optim adamw"):
        train(tiny_settings(tiny_lm, data, max_steps=4, optim="adamw-8bit"), run, resume=True, progress=False)


def in_backward_settings(tiny_lm, data, in_backward: bool, **opts):
    return tiny_settings(tiny_lm, data, grad_accumulation=1, max_grad_norm=0.0, optimizer_in_backward=in_backward,
                         rank_rule="step", **opts)


def _metrics(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(m["rank"], m["loss"], m["grad_norm"]) for m in lines if "grad_norm" in m]


@pytest.mark.parametrize("optim", ["adamw", "adamw-8bit"])
def test_optimizer_in_backward_trains_as_the_step_after_backward(tiny_lm, tmp_path, optim):
    """Same seed, same steps: the adapters, losses and gradient norms of a run that updates each
    parameter inside backward equal those of the ordinary run (to float32 rounding)."""
    data = write_sums(tmp_path / "sums.jsonl")
    runs = {}
    for flag in (False, True):
        s = in_backward_settings(tiny_lm, data, flag, max_steps=5, optim=optim)
        if optim == "adamw-8bit":
            s = dataclasses.replace(s, adapter=dataclasses.replace(s.adapter, max_rank=64,
                                                                  target_modules=["q_proj", "o_proj"]))
        runs[flag] = tmp_path / f"run-{flag}"
        train(s, runs[flag], progress=False)
    a, b = load_file(runs[False] / "adapter.safetensors"), load_file(runs[True] / "adapter.safetensors")
    assert any(t.abs().sum() > 0 for k, t in a.items() if k.endswith("lora_B"))  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    plain, fused = _metrics(runs[False]), _metrics(runs[True])
    assert len(plain) == 5 and [m[0] for m in plain] == [m[0] for m in fused]
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(plain, fused):
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and norm_b == pytest.approx(norm_a, rel=1e-4)


def test_optimizer_in_backward_frees_each_gradient_and_detaches_after_training(tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    from qdylora import prepare

    model = prepare(tiny_lm, QDyLoRAConfig(max_rank=8, compute_dtype="float32"), device="cpu")
    params = model.adapter_parameters()
    opt = make_optimizer("adamw", params, 1e-2, 0.0, torch.device("cpu"), in_backward=True)
    held = []  # how many gradients exist when each parameter's update runs
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: held.append(sum(q.grad is not None for q in params)))
    before = [p.detach().clone() for p in params]
    x = torch.randint(0, 100, (2, 12))
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is None for p in params)
    assert max(held) <= 2  # at most the one being applied and one more in flight, never all
    assert any(not torch.equal(p.detach(), q) for p, q in zip(params, before))  # updated in backward
    assert opt.grad_norm() > 0
    opt.remove_hooks()
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in params)  # an ordinary backward again

    run = tmp_path / "run"
    train(in_backward_settings(tiny_lm, data, True, max_steps=2), run, progress=False, model=model)
    for p in params:
        p.grad = None
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in params)  # train() removed its hooks


def test_optimizer_in_backward_resumes_exactly_and_refuses_what_it_cannot_do(tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    opts = dict(max_steps=6, save_every=2, optim="adamw-8bit")
    full = tmp_path / "full"
    train(in_backward_settings(tiny_lm, data, True, **opts), full, progress=False)
    stopped_at_4_then_resumed(in_backward_settings(tiny_lm, data, True, **opts), tmp_path / "part")
    a, b = load_file(full / "adapter.safetensors"), load_file(tmp_path / "part" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(QDyLoRAError, match="trained with --optimizer-in-backward; resume with it"):
        train(in_backward_settings(tiny_lm, data, False, **{**opts, "max_steps": 8}), full, resume=True, progress=False)
    with pytest.raises(QDyLoRAError, match="rules out --grad-accumulation > 1 and --max-grad-norm > 0"):
        TrainSettings(optimizer_in_backward=True, grad_accumulation=2)
