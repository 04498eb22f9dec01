"""prepare() on tiny random models of several architectures, end to end."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

import qdylora
from qdylora import QDyLoRAConfig, QDyLoRAError, QDyLoRALinear

from ..conftest import COMPUTE_DTYPES, LINEARS_PER_BLOCK, LOGIT_TOL, VOCAB, tiny_model, transformers_4bit

ARCHS = ["llama", "mistral", "qwen2", "gpt2", "opt", "falcon"]
FP32 = dict(max_rank=8, alpha=16, compute_dtype="float32", dropout=0.0)


def ids(batch=4, seq=10, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def randomize_B(model, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


@pytest.mark.parametrize("arch", ARCHS)
def test_prepare_structure(arch, tiny_dir):
    model = qdylora.prepare(tiny_dir(arch), QDyLoRAConfig(**FP32))
    adapters = model.adapter_layers()
    assert len(adapters) == 2 * LINEARS_PER_BLOCK[arch]
    for layer in adapters.values():
        assert isinstance(layer.base, bnb.nn.Linear4bit)
        assert layer.base.weight.quant_state.quant_type == "nf4"
        assert layer.lora_A.shape == (8, layer.in_features)
        assert layer.lora_B.shape == (layer.out_features, 8)
    head = model.model.get_output_embeddings()
    assert type(head) is nn.Linear and head.weight.dtype == torch.float32
    assert isinstance(model.model.get_input_embeddings(), nn.Embedding)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{n}.{p}" for n in adapters for p in ("lora_A", "lora_B")}
    assert [p for p in model.adapter_parameters()] == [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_model_equals_its_base_at_every_rank(arch, tiny_dir):
    model = qdylora.prepare(tiny_dir(arch), QDyLoRAConfig(**FP32)).eval()
    x = ids()
    with qdylora.at_rank(model, 0):
        base = logits(model, x)
    for b in range(1, 9):
        qdylora.set_rank(model, b)
        assert torch.equal(logits(model, x), base)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_base_is_the_transformers_bitsandbytes_model(arch, tiny_dir):
    """Rank 0 is exactly QLoRA's base: transformers + BitsAndBytesConfig(nf4, double quant)."""
    ours = qdylora.prepare(tiny_dir(arch), QDyLoRAConfig(**FP32)).eval()
    ref = transformers_4bit(tiny_dir(arch), torch.float32)
    x = ids()
    qdylora.set_rank(ours, 0)
    assert torch.equal(logits(ours, x), logits(ref, x))


def test_loaded_module_and_path_quantize_identically(tiny_dir):
    from_path = qdylora.prepare(tiny_dir("llama"), QDyLoRAConfig(**FP32)).eval()
    from_module = qdylora.prepare(tiny_model("llama"), QDyLoRAConfig(**FP32)).eval()
    a, b = from_path.adapter_layers(), from_module.adapter_layers()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].base.weight.data, b[name].base.weight.data), name
        assert torch.equal(a[name].lora_A, b[name].lora_A), name  # same seed, same order
    x = ids()
    torch.testing.assert_close(logits(from_path, x), logits(from_module, x))


@pytest.mark.parametrize("dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_training_moves_the_adapter_and_ranks_mix_per_example(arch, dtype, tiny_dir):
    model = qdylora.prepare(tiny_dir(arch), QDyLoRAConfig(**{**FP32, "compute_dtype": dtype}))
    x = ids(batch=4, seq=12)
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    model.train()
    losses = []
    for step in range(12):
        qdylora.set_rank(model, [8, 1, 4, 2][step % 4])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with qdylora.at_rank(model, 0):
        base = logits(model, x)
    with qdylora.at_rank(model, 8):
        tuned = logits(model, x)
    assert (tuned - base).abs().max() > 1e-2  # the adapter is not a no-op

    ranks = [0, 1, 4, 8]
    with qdylora.at_rank(model, ranks):
        mixed = logits(model, x)
    for i, b in enumerate(ranks):
        with qdylora.at_rank(model, b):
            alone = logits(model, x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1].float(), alone.float(), **LOGIT_TOL[dtype])


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float32"])
def test_eval_then_train_keeps_gradients(compute_dtype, tiny_dir):
    """Regression for bitsandbytes' CPU repacking in eval: gradients after an evaluation must be
    those of a model that was never evaluated."""
    cfg = QDyLoRAConfig(max_rank=8, dropout=0.0, compute_dtype=compute_dtype)
    evaluated, fresh = (qdylora.prepare(tiny_dir("llama"), cfg) for _ in range(2))
    randomize_B(evaluated)
    randomize_B(fresh)
    x = ids()
    evaluated.eval()
    with torch.no_grad():
        evaluated(input_ids=x)
    for model in (evaluated, fresh):
        model.train()
        model(input_ids=x, labels=x).loss.backward()
    for (name, p), q in zip(evaluated.named_parameters(), fresh.parameters()):
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert torch.equal(p.grad, q.grad), name
    # the first layer's A only gets gradient through every later layer's quantized base
    first = next(iter(evaluated.adapter_layers().values()))
    assert first.lora_A.grad.abs().sum() > 0


def test_explicit_targets(tiny_dir):
    model = qdylora.prepare(tiny_dir("llama"), QDyLoRAConfig(max_rank=8, target_modules=["q_proj", "self_attn.v_proj"]))
    assert sorted(model.adapter_layers()) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    mlp = model.model.model.layers[0].mlp
    assert isinstance(mlp.up_proj, bnb.nn.Linear4bit)  # quantized and frozen, no adapter
    assert not any(p.requires_grad for p in mlp.parameters())


def test_single_target_name_is_a_list():
    assert QDyLoRAConfig(target_modules="q_proj").target_modules == ["q_proj"]


def test_target_that_matches_nothing_lists_what_exists(tiny_dir):
    with pytest.raises(QDyLoRAError, match=r"matches no layer.*gate_proj.*q_proj"):
        qdylora.prepare(tiny_dir("llama"), QDyLoRAConfig(target_modules=["query"]))


def test_target_that_is_not_linear_is_refused(tiny_dir):
    with pytest.raises(QDyLoRAError, match="not a linear layer"):
        qdylora.prepare(tiny_dir("llama"), QDyLoRAConfig(target_modules=["q_proj", "mlp"]))


def test_seed_decides_the_initialisation(tiny_dir):
    a = qdylora.prepare(tiny_model("llama"), QDyLoRAConfig(max_rank=8, seed=1)).adapter_state_dict()
    b = qdylora.prepare(tiny_model("llama"), QDyLoRAConfig(max_rank=8, seed=1)).adapter_state_dict()
    c = qdylora.prepare(tiny_model("llama"), QDyLoRAConfig(max_rank=8, seed=2)).adapter_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if k.endswith("lora_A"))


def test_adapter_state_dict_round_trip(tiny_dir):
    model = qdylora.prepare(tiny_dir("llama"), QDyLoRAConfig(**FP32))
    randomize_B(model)
    state = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    other = qdylora.prepare(tiny_dir("llama"), QDyLoRAConfig(**{**FP32, "seed": 5}))
    other.load_adapter_state_dict(state)
    x = ids()
    torch.testing.assert_close(logits(model.eval(), x), logits(other.eval(), x), rtol=0, atol=0)
    with pytest.raises(QDyLoRAError, match="does not fit"):
        other.load_adapter_state_dict({k: v for k, v in state.items() if "layers.0." not in k})
    bad = dict(state)
    key = next(iter(bad))
    bad[key] = bad[key][:4]
    with pytest.raises(QDyLoRAError, match="has shape"):
        other.load_adapter_state_dict(bad)


def test_update_mode_from_config(tiny_dir):
    model = qdylora.prepare(tiny_dir("llama"), QDyLoRAConfig(max_rank=8, update_mode="frozen"))
    assert {l.update_mode for l in model.adapter_layers().values()} == {"frozen"}
    qdylora.set_update_mode(model, "full")
    assert {l.update_mode for l in model.adapter_layers().values()} == {"full"}


def test_already_prepared_is_refused(tiny_dir):
    model = qdylora.prepare(tiny_dir("llama"), QDyLoRAConfig(max_rank=8))
    with pytest.raises(QDyLoRAError, match="already prepared"):
        qdylora.prepare(model)
    with pytest.raises(QDyLoRAError, match="already prepared"):
        qdylora.prepare(model.model)


def test_missing_path(tmp_path):
    with pytest.raises(QDyLoRAError, match="does not exist"):
        qdylora.prepare(str(tmp_path / "nope"))


def test_directory_without_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(QDyLoRAError, match="not a model directory"):
        qdylora.prepare(str(tmp_path))


@pytest.mark.parametrize("how", ["truncate", "header"])
def test_damaged_model_weights_are_one_line(tmp_path, how):
    """A truncated or corrupted model.safetensors ended in a SafetensorError traceback."""
    tiny_model("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2] if how == "truncate" else b"\xff" * 16 + raw[16:])
    with pytest.raises(QDyLoRAError, match="the weights in .* are damaged or truncated"):
        qdylora.prepare(str(tmp_path))


def test_not_a_causal_lm(tmp_path):
    cfg = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    with pytest.raises(QDyLoRAError, match="cannot load a causal LM"):
        qdylora.prepare(str(tmp_path))


def test_pickle_checkpoints_are_not_loaded(tmp_path):
    """Weights come from safetensors only: a pytorch_model.bin (pickle) directory is refused."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(QDyLoRAError, match="cannot load a causal LM"):
        qdylora.prepare(str(tmp_path))


def test_config_validation():
    for bad in [dict(max_rank=0), dict(alpha=0), dict(alpha=float("nan")), dict(alpha=float("inf")),
                dict(scaling="log"), dict(dropout=1.0), dict(dropout=float("nan")),
                dict(update_mode="half"), dict(compute_dtype="int8"), dict(target_modules=[])]:
        with pytest.raises(QDyLoRAError):
            QDyLoRAConfig(**bad)
    cfg = QDyLoRAConfig(max_rank=4, target_modules=["q_proj"])
    assert QDyLoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(QDyLoRAError, match="unknown"):
        QDyLoRAConfig.from_dict({"rank": 3})


def test_qdylora_linear_is_exported():
    assert issubclass(QDyLoRALinear, nn.Module)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_per_example_training_gradient_equals_separate_runs(arch, tiny_dir):
    """One backward through a batch whose rows run at different ranks (the `example` and
    `sandwich` rules) gives the sum of the gradients of each row alone at its rank."""
    from qdylora.training.losses import loss_sum

    model = qdylora.prepare(tiny_dir(arch), QDyLoRAConfig(**FP32)).eval()  # GPT-2's and OPT's own dropout off
    randomize_B(model, std=0.05)
    x = ids(batch=4, seq=9)
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    ranks = [8, 1, 5, 8]
    params = model.adapter_parameters()

    def grads(rows, rank):
        model.zero_grad()
        qdylora.set_rank(model, rank)
        total, _ = loss_sum(model, {k: v[rows] for k, v in batch.items()})
        total.backward()
        return [p.grad.clone() for p in params]

    together = grads(slice(None), ranks)
    apart = [sum(g) for g in zip(*(grads(slice(i, i + 1), b) for i, b in enumerate(ranks)))]
    for got, want in zip(together, apart):  # float32 sums in another order
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert max(g.abs().max() for g in together) > 1e-3  # not a no-op


def test_a_max_rank_wider_than_a_targeted_layer_is_refused(tiny_dir):
    """rank(B A) <= min(in, out): R = 100000 on a 64-wide model wrote an 819 MB adapter."""
    path = tiny_dir("llama")
    widths = {name: min(layer.in_features, layer.out_features)
              for name, layer in tiny_model("llama").named_modules() if isinstance(layer, nn.Linear)
              and name != "lm_head"}
    narrowest = min(widths.values())
    qdylora.prepare(path, QDyLoRAConfig(max_rank=narrowest))  # at the bound: accepted
    with pytest.raises(QDyLoRAError, match=f"max_rank {narrowest + 1} is above the narrowest targeted layer"):
        qdylora.prepare(path, QDyLoRAConfig(max_rank=narrowest + 1))
    gpt2 = tiny_dir("gpt2")  # Conv1D layers store their weight (in, out)
    with pytest.raises(QDyLoRAError, match="is above the narrowest targeted layer"):
        qdylora.prepare(gpt2, QDyLoRAConfig(max_rank=10_000))


def test_frozen_dtype_stores_the_unquantized_weights_smaller_and_computes_as_before(tiny_dir):
    """frozen_dtype bfloat16 with float32 compute: embeddings, norms and head in bfloat16 (half
    of `other`, but for the rotary buffers), NF4 products and adapters still float32; rank 0 is
    exactly QLoRA's base loaded so (transformers' dtype=bfloat16, bnb compute float32), a non-zero
    adapter changes the logits, and a backward reaches A and B in float32."""
    full = qdylora.prepare(tiny_dir("llama"), QDyLoRAConfig(**FP32)).eval()
    half = qdylora.prepare(tiny_dir("llama"), QDyLoRAConfig(**FP32, frozen_dtype="bf16")).eval()
    assert half.qdylora_config.frozen_dtype == "bfloat16"
    assert half.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert half.model.get_output_embeddings().weight.dtype == torch.bfloat16
    layers = half.adapter_layers().values()
    assert all(l.base.compute_dtype == torch.float32 and l.lora_A.dtype == torch.float32 for l in layers)
    assert qdylora.memory_report(half).other.bytes < 0.51 * qdylora.memory_report(full).other.bytes
    x = ids()
    ref = transformers_4bit(tiny_dir("llama"), torch.float32, frozen_dtype=torch.bfloat16)
    qdylora.set_rank(half, 0)
    assert torch.equal(logits(half, x), logits(ref, x))
    with torch.no_grad():
        for layer in layers:
            torch.nn.init.normal_(layer.lora_B, std=0.02)
    qdylora.set_rank(half, 8)
    assert (logits(half, x).float() - logits(ref, x).float()).abs().max() > 0.01
    half.train()
    half(input_ids=x, labels=x).loss.backward()
    assert all(l.lora_B.grad is not None and l.lora_B.grad.dtype == torch.float32 for l in layers)
    with pytest.raises(QDyLoRAError, match="frozen_dtype must be one of auto, "):
        QDyLoRAConfig(frozen_dtype="int8")
