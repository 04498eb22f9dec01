"""SVD ordering of an adapter: every prefix is the best rank-b approximation of the full delta."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import qdylora
from qdylora.core.ordering import order_by_svd, svd_factors, svd_ordered
from qdylora.core.scaling import scale
from qdylora.export.peft import export_peft

from ..conftest import VOCAB, adapted_model


def truncated_svd(D: torch.Tensor, b: int) -> torch.Tensor:
    """The best rank-b approximation of D, from the SVD of D itself (the float64 reference)."""
    u, s, vh = torch.linalg.svd(D, full_matrices=False)
    return (u[:, :b] * s[:b]) @ vh[:b]


@pytest.mark.parametrize("out_features, in_features, R, true_rank", [(12, 10, 6, 6), (12, 10, 6, 3), (4, 10, 6, 4)])
def test_every_prefix_is_the_best_approximation(out_features, in_features, R, true_rank):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(R, in_features, generator=g, dtype=torch.float64)
    B = torch.randn(out_features, true_rank, generator=g, dtype=torch.float64) @ \
        torch.randn(true_rank, R, generator=g, dtype=torch.float64)  # rank(B A) = true_rank
    c, c_new = 16 / R**0.5, 16 / 6**0.5
    D = c * B @ A
    A2, B2 = svd_factors(A, B, c, c_new)
    assert A2.shape == A.shape and B2.shape == B.shape
    for b in range(1, R + 1):
        torch.testing.assert_close(c_new * B2[:, :b] @ A2[:b], truncated_svd(D, b), rtol=0, atol=1e-10)
    torch.testing.assert_close(c_new * B2 @ A2, D, rtol=0, atol=1e-10)  # nothing lost at full rank
    # component norms descend: A'[i] and B'[:, i] carry sqrt(sigma_i / c_new) each
    norms = A2.norm(dim=1)
    assert torch.all(norms[:-1] >= norms[1:] - 1e-12)
    assert torch.all(norms[min(true_rank, out_features):] < 1e-6)  # sqrt of a rounding-level sigma


def test_ordering_keeps_the_full_rank_and_improves_low_ranks(tiny_dir):
    model = adapted_model(tiny_dir("llama"), scaling="rslora")
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    layers = model.adapter_layers()
    before = {n: scale(16, 8, "rslora", 8) * (l.lora_B.double() @ l.lora_A.double()) for n, l in layers.items()}
    with torch.no_grad(), qdylora.at_rank(model, 8):
        full = model(input_ids=x).logits
    with torch.no_grad(), qdylora.at_rank(model, 2):
        rank2 = model(input_ids=x).logits

    order_by_svd(model)

    assert model.qdylora_config.scaling == "nested" and all(l.scaling == "nested" for l in layers.values())
    with torch.no_grad(), qdylora.at_rank(model, 8):
        torch.testing.assert_close(model(input_ids=x).logits, full, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), qdylora.at_rank(model, 2):
        assert (model(input_ids=x).logits - rank2).abs().max() > 1e-2  # rank 2 changed: not a no-op
    c_new = scale(16, 8, "nested", 8)
    for name, layer in layers.items():
        ours = c_new * layer.lora_B[:, :2].double() @ layer.lora_A[:2].double()
        torch.testing.assert_close(ours, truncated_svd(before[name], 2), rtol=0, atol=1e-5)  # float32 factors


@pytest.mark.parametrize("from_file", [False, True])
def test_svd_ordered_restores_the_trained_factors_exactly(tiny_dir, tmp_path, from_file):
    """From copies in memory, or read back from a file of the trained factors (what training
    does when it has just written them: no second copy of the adapters in memory)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = adapted_model(tiny_dir("llama"), scaling="rslora")
    saved = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    save_file(saved, tmp_path / "trained.safetensors")
    config = model.qdylora_config
    with safe_open(str(tmp_path / "trained.safetensors"), framework="pt") as f:
        trained = (lambda name: (f.get_tensor(f"{name}.lora_A"), f.get_tensor(f"{name}.lora_B"))) if from_file else None
        with svd_ordered(model, trained):
            assert model.qdylora_config.scaling == "nested"
            assert any(not torch.equal(v, saved[k]) for k, v in model.adapter_state_dict().items())
    assert model.qdylora_config == config
    assert all(layer.scaling == "rslora" for layer in model.adapter_layers().values())
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(v, saved[k])


def test_the_same_product_as_peft_convert_to_lora(tiny_dir, tmp_path):
    """PEFT 0.21's `convert_to_lora` (SVD of each full delta) gives our rank-b deltas."""
    peft = pytest.importorskip("peft")
    conversion = pytest.importorskip("peft.tuners.lora.conversion")
    path = tiny_dir("llama")
    model = adapted_model(path, scaling="rslora")
    export_peft(model, 8, tmp_path / "full")  # the full adapter as PEFT loads it
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "full")
    order_by_svd(model)
    c_new = scale(16, 8, "nested", 8)
    rank = 3
    with pytest.warns(UserWarning, match="already a LoRA adapter"):
        config, state = conversion.convert_to_lora(peft_model, rank)
    assert config.r == rank
    compared = 0
    for name, layer in model.adapter_layers().items():
        A = state[f"base_model.model.{name}.lora_A.weight"].double()  # (rank, in)
        B = state[f"base_model.model.{name}.lora_B.weight"].double()  # (out, rank), scale 1
        ours = c_new * layer.lora_B[:, :rank].double() @ layer.lora_A[:rank].double()
        torch.testing.assert_close(ours, B @ A, rtol=0, atol=1e-5)
        compared += 1
    assert compared == len(model.adapter_layers()) > 0
