"""What only a GPU can show: the NF4 layers, per-example ranks, training with resume, the PEFT
export on transformers' CUDA 4-bit model, merge, generation and bitsandbytes' paged optimizers,
on CUDA in bfloat16 (float32 where a check needs exact equality).

Marked `cuda`: skipped without a GPU; `make gpu-check` runs them. `pytest -m cuda --cuda-device cpu`
runs the same tests on the CPU, which checks the tests themselves where no GPU is.
"""

from __future__ import annotations

import dataclasses
import json

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import qdylora
from qdylora.core.layer import QDyLoRALinear
from qdylora.core.loading import bnb_config
from qdylora.core.quantize import dequantized_weight, quantize_linear
from qdylora.data.batching import fixed_batches
from qdylora.data.rows import RowFormat, generation_prompts, tokenize
from qdylora.evaluation.generation import generate_at_ranks
from qdylora.export.merge import merge
from qdylora.export.peft import export_peft
from qdylora.training.losses import losses_at_ranks
from qdylora.training.optimizers import make_optimizer
from qdylora.training.adapter_file import read_adapter_metadata
from qdylora.training.rundir import load_run
from qdylora.training.trainer import train

from .conftest import LOGIT_TOL, VOCAB, adapted_model, char_tokenizer, tiny_settings, transformers_4bit, write_sums
from .training.test_trainer import stopped_at_4_then_resumed

pytestmark = pytest.mark.cuda
BF16_TOL = dict(rtol=3e-2, atol=3e-2)  # bf16: 8 bits of mantissa, a few roundings deep
IN, OUT, R, ALPHA = 96, 80, 16, 8.0


@pytest.fixture(scope="module")
def device(pytestconfig) -> torch.device:
    name = pytestconfig.getoption("--cuda-device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (make gpu-check on a GPU machine)")
    return torch.device(name)


def to_device(model, device):
    """A CPU-prepared tiny model moved to `device` (bitsandbytes moves the NF4 state along)."""
    return model.to(device)


@pytest.mark.parametrize("b", [1, 5, R])
def test_nf4_layer_forward_and_backward_match_float64(device, b):
    """y = W~ x + bias + s(b) B[:, :b] A[:b] x and its gradients for x, A and B, in bf16 on the
    device, against float64 of the same formula from the dequantized weight."""
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT).to(device)
    layer = QDyLoRALinear(quantize_linear(linear, torch.bfloat16), R, ALPHA, "standard", 0.0, "full", torch.bfloat16)
    assert layer.lora_A.device.type == device.type and layer.base.weight.device.type == device.type
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    layer.rank = b
    x = torch.randn(3, 7, IN, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 7, OUT, device=device, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    (y.double() * g).sum().backward()

    W = dequantized_weight(layer.base).double()  # (out, in)
    A = layer.lora_A.detach().double().requires_grad_()
    B = layer.lora_B.detach().double().requires_grad_()
    xr = x.detach().double().requires_grad_()
    s = ALPHA / b
    ref = xr @ W.T + layer.base.bias.double() + s * (xr @ A[:b].T) @ B[:, :b].T
    (ref * g).sum().backward()
    torch.testing.assert_close(y.double(), ref.detach(), **BF16_TOL)
    scale = lambda t: t.abs().max().item()  # noqa: E731  (gradient sums of ~20 bf16 products)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=3e-2, atol=3e-2 * scale(xr.grad))
    torch.testing.assert_close(layer.lora_A.grad.double(), A.grad, rtol=3e-2, atol=3e-2 * scale(A.grad))
    torch.testing.assert_close(layer.lora_B.grad.double(), B.grad, rtol=3e-2, atol=3e-2 * scale(B.grad))
    assert layer.lora_A.grad[b:].abs().sum() == 0 and layer.lora_B.grad[:, b:].abs().sum() == 0


def test_per_example_ranks_equal_each_row_at_its_rank(device, tiny_dir):
    model = to_device(adapted_model(tiny_dir("llama"), compute_dtype="float32"), device)
    x = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0)).to(device)
    ranks = [0, 2, 5, 8]
    with torch.no_grad():
        qdylora.set_rank(model, ranks)
        mixed = model(input_ids=x).logits
        for i, r in enumerate(ranks):
            qdylora.set_rank(model, r)
            torch.testing.assert_close(mixed[i], model(input_ids=x[i:i + 1]).logits[0], **LOGIT_TOL["float32"])
    assert (mixed[0] - mixed[3]).abs().max() > 1e-2


@pytest.fixture(scope="module")
def cuda_run(device, tiny_lm, tmp_path_factory):
    """A 6-step bf16 run of the tiny Llama on the device (checkpoints every 2 steps)."""
    root = tmp_path_factory.mktemp("cuda_run")
    data = write_sums(root / "sums.jsonl", n=40)
    settings = dataclasses.replace(tiny_settings(tiny_lm, data, compute_dtype="bfloat16", max_steps=6, save_every=2),
                                   device=str(device))
    summary = train(settings, root / "run", progress=False)
    return root / "run", settings, summary


def test_training_on_the_device_learns_and_resumes(device, cuda_run, tmp_path):
    run, settings, summary = cuda_run
    assert summary["val_loss_after"]["8"] < summary["val_loss_before"]["8"]
    assert json.loads((run / "config.json").read_text())["settings"]["device"] == str(device)
    stopped_at_4_then_resumed(settings, tmp_path / "part")
    a, b = load_file(run / "adapter.safetensors"), load_file(tmp_path / "part" / "adapter.safetensors")
    for k in a:  # CUDA kernels may sum in another order after a restart: bf16-close, not bitwise
        torch.testing.assert_close(b[k], a[k], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("optim", ["paged-adamw", "paged-adamw-8bit"])
def test_paged_optimizers_train_and_resume(device, tiny_lm, tmp_path, optim):
    params = [nn.Parameter(torch.randn(64, 4096, device=device))]
    opt = make_optimizer(optim, params, 1e-3, 0.0, device)
    if device.type == "cuda":  # paged state lives in CUDA unified memory; a CPU falls back
        assert type(opt) is {"paged-adamw": bnb.optim.PagedAdamW, "paged-adamw-8bit": bnb.optim.PagedAdamW8bit}[optim]
    data = write_sums(tmp_path / "sums.jsonl")
    s = tiny_settings(tiny_lm, data, compute_dtype="bfloat16", optim=optim, max_steps=6, save_every=2)
    s = dataclasses.replace(s, device=str(device),
                            adapter=dataclasses.replace(s.adapter, max_rank=64, target_modules=["q_proj", "o_proj"]))
    summary = train(s, tmp_path / "full", progress=False)
    assert summary["val_loss_after"]["64"] < summary["val_loss_before"]["64"]
    stopped_at_4_then_resumed(s, tmp_path / "part")
    a, b = load_file(tmp_path / "full" / "adapter.safetensors"), load_file(tmp_path / "part" / "adapter.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-2, atol=1e-3)


def test_optimizer_in_backward_on_the_device(device, tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    runs = {}
    for flag in (False, True):
        s = tiny_settings(tiny_lm, data, compute_dtype="bfloat16", grad_accumulation=1, max_grad_norm=0.0,
                          optimizer_in_backward=flag, max_steps=4)
        train(dataclasses.replace(s, device=str(device)), tmp_path / str(flag), progress=False)
        runs[flag] = load_file(tmp_path / str(flag) / "adapter.safetensors")
    for k in runs[False]:
        torch.testing.assert_close(runs[True][k], runs[False][k], rtol=1e-3, atol=1e-4)


def test_peft_on_transformers_cuda_4bit_model_reproduces_our_logits(device, tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    path = tiny_dir("llama")
    model = to_device(adapted_model(path, compute_dtype="bfloat16"), device)
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        with qdylora.at_rank(model, 3):
            ours = model(input_ids=x).logits
        with qdylora.at_rank(model, 0):
            assert (model(input_ids=x).logits - ours).abs().max() > 1e-2  # not a no-op
    out = export_peft(model, 3, tmp_path / "peft")
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(torch.bfloat16),
                                                dtype=torch.bfloat16, device_map={"": device})
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits.float(), ours.float(), **LOGIT_TOL["bfloat16"])


def test_merge_on_the_device_matches_the_adapter(device, tiny_dir, tmp_path):
    model = to_device(adapted_model(tiny_dir("llama"), compute_dtype="bfloat16"), device)
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), qdylora.at_rank(model, 5):
        ours = model(input_ids=x).logits
    out = merge(model, 5, tmp_path / "merged", tokenizer=char_tokenizer(), dtype="bfloat16")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(device).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits.float(), ours.float(), **LOGIT_TOL["bfloat16"])


def test_generation_and_sweep_on_the_device(device, cuda_run):
    """The bf16 run's adapter on a float32 model on the device (greedy decoding compares exactly
    only where near-ties cannot flip): rank-batched generation and losses equal one rank at a
    time, and the adapter changes what is generated and lowers the loss."""
    run, settings, _ = cuda_run
    _, tok, s = load_run(run, str(device))
    config = dataclasses.replace(read_adapter_metadata(run / "adapter.safetensors")["config"], compute_dtype="float32")
    model = qdylora.prepare(s.model, config, device=str(device)).eval()
    model.load_adapter_state_dict(load_file(run / "adapter.safetensors"))  # (its base fingerprint has bf16 embeddings)
    assert next(model.parameters()).device.type == device.type
    rows = [json.loads(line) for line in open(s.data.data).read().splitlines()[:6]]
    fmt = RowFormat("template", "{question}", "{answer}")  # tiny_settings' templates
    prompts, _ = generation_prompts(rows, tok, fmt)
    batched = generate_at_ranks(model, tok, prompts, [0, 4, 8], batch_size=4, max_new_tokens=4, device=device)
    sequential = generate_at_ranks(model, tok, prompts, [0, 4, 8], batch_size=4, max_new_tokens=4,
                                   rank_batch=1, device=device)
    assert batched == sequential and batched[0] != batched[8]
    examples, _ = tokenize(rows, tok, fmt)
    losses = losses_at_ranks(model, fixed_batches(examples, 4), [0, 8], tok.pad_token_id, device)
    one = losses_at_ranks(model, fixed_batches(examples, 4), [0, 8], tok.pad_token_id, device, rank_batch=1)
    for r in (0, 8):
        assert losses[r][0] == pytest.approx(one[r][0], rel=1e-5)
    assert losses[8][0] < losses[0][0]


def test_calibration_and_an_allocation_on_the_device(device, tiny_dir, tmp_path):
    """G and P taken on the device equal the CPU's; the allocated adapter's PEFT export (padded
    layout) reproduces our logits on transformers' 4-bit model on the device."""
    peft = pytest.importorskip("peft")
    from qdylora.core.allocation import Allocation, allocate, layer_costs
    from qdylora.training.calibration import calibrate, layer_errors

    path = tiny_dir("llama")
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
    cpu_model = adapted_model(path, "nested")
    on_cpu = calibrate(cpu_model, [batch])
    model = to_device(adapted_model(path, "nested"), device)
    stats = calibrate(model, [{k: v.to(device) for k, v in batch.items()}])
    for p in on_cpu.G:
        torch.testing.assert_close(stats.G[p], on_cpu.G[p], rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(stats.P[p], on_cpu.P[p], rtol=1e-3, atol=1e-9)
    costs = layer_costs(model)
    allocation = Allocation.of(allocate(layer_errors(model, "loss", stats), costs, 3 * sum(costs.values())), "a")
    with torch.no_grad(), qdylora.at_rank(model, allocation):
        ours = model(input_ids=x.to(device)).logits
    out = export_peft(model, allocation, tmp_path / "peft", layout="padded")
    base = transformers_4bit(path, torch.float32).to(device)  # CPU repacking off, as in our layers
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, out).eval()(input_ids=x.to(device)).logits
    torch.testing.assert_close(theirs.float(), ours.float(), **LOGIT_TOL["float32"])
