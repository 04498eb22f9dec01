"""Export to PEFT: PEFT itself loads the adapter and reproduces our logits at that rank."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import qdylora
from qdylora.core.scaling import scale
from qdylora.errors import QDyLoRAError
from qdylora.export.peft import export_peft

from ..conftest import COMPUTE_DTYPES, LOGIT_TOL, VOCAB, adapted_model, transformers_4bit

peft = pytest.importorskip("peft")


def merged_reference(path, model, rank):
    """The full-precision base with s(b) B[:, :b] A[:b] added to each weight in float64."""
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    s = scale(model.qdylora_config.alpha, rank, model.qdylora_config.scaling, model.qdylora_config.max_rank)
    with torch.no_grad():
        for name, layer in model.adapter_layers().items():
            delta = s * layer.lora_B[:, :rank].double() @ layer.lora_A[:rank].double()  # (out, in)
            target = ref.get_submodule(name)
            target.weight += delta.t() if isinstance(target, Conv1D) else delta
    return ref


@pytest.mark.parametrize("dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("arch, scaling", [("llama", "standard"), ("qwen2", "standard"), ("gpt2", "standard"),
                                           ("llama", "rslora"), ("llama", "nested")])
def test_peft_reproduces_our_logits(arch, scaling, dtype, tiny_dir, tmp_path):
    path = tiny_dir(arch)
    model = adapted_model(path, scaling, compute_dtype=dtype)
    rank = 3
    out = export_peft(model, rank, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    alpha = 16 / 8**0.5 * rank if scaling == "nested" else 16  # PEFT's lora_alpha / r is our s(b)
    assert config["r"] == rank and config["lora_alpha"] == alpha and config["use_rslora"] == (scaling == "rslora")
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with qdylora.at_rank(model, rank):
            ours = model(input_ids=x).logits
        with qdylora.at_rank(model, 0):
            assert (model(input_ids=x).logits - ours).abs().max() > 1e-2  # the adapter is not a no-op

        # 4-bit: PEFT on transformers' own NF4 model (the same quantization as ours), in our dtype.
        peft4 = peft.PeftModel.from_pretrained(transformers_4bit(path, getattr(torch, dtype)), out).eval()
        torch.testing.assert_close(peft4(input_ids=x).logits.float(), ours.float(), **LOGIT_TOL[dtype])

        # Full precision: PEFT on the unquantized base equals the float64 merged reference.
        basefp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        pefffp = peft.PeftModel.from_pretrained(basefp, out).eval()
        ref = merged_reference(path, model, rank)(input_ids=x).logits
        torch.testing.assert_close(pefffp(input_ids=x).logits.double(), ref, rtol=1e-4, atol=1e-4)


def test_export_refuses_bad_rank_and_existing_dir(tiny_dir, tmp_path):
    model = adapted_model(tiny_dir("llama"))
    with pytest.raises(QDyLoRAError, match="outside 1..8"):
        export_peft(model, 9, tmp_path / "a")
    with pytest.raises(QDyLoRAError, match="outside 1..8"):
        export_peft(model, 0, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    with pytest.raises(QDyLoRAError, match="already exists"):
        export_peft(model, 2, tmp_path / "b")
    export_peft(model, 2, tmp_path / "b", overwrite=True)
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()
    export_peft(model, 3, tmp_path / "b", overwrite=True)  # an earlier export: replaced
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["r"] == 3
    # --overwrite never deletes a user's file (it removed one that stood in the target)
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(QDyLoRAError, match=r"holds files qdylora did not write there \(notes.txt\)"):
        export_peft(model, 2, tmp_path / "b", overwrite=True)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    (tmp_path / "c").write_text("a file")
    with pytest.raises(QDyLoRAError, match="is a file, not an output directory"):
        export_peft(model, 2, tmp_path / "c", overwrite=True)
    assert (tmp_path / "c").read_text() == "a file"


def mixed_allocation(model):
    """Per-layer ranks 0..8 cycling over the layers (some off, some full), as an allocation."""
    from qdylora.core.allocation import Allocation

    return Allocation.of({p: (5 * i) % 9 for i, p in enumerate(model.adapter_layers())}, "mixed")


@pytest.mark.parametrize("layout", ["patterns", "padded"])
def test_peft_reproduces_an_allocation(layout, tiny_dir, tmp_path):
    """Per-layer ranks exported as PEFT's rank_pattern / alpha_pattern, or zero-padded with the
    scale folded into lora_B (vLLM's reading): PEFT's logits are ours under the allocation."""
    path = tiny_dir("llama")
    model = adapted_model(path, "nested")
    allocation = mixed_allocation(model)
    ranks = allocation.as_dict()
    assert 0 in ranks.values() and 8 in ranks.values()
    out = export_peft(model, allocation, tmp_path / "peft", layout=layout)
    config = json.loads((out / "adapter_config.json").read_text())
    used = {p: b for p, b in ranks.items() if b > 0}
    if layout == "padded":
        assert config["r"] == max(used.values()) and config["lora_alpha"] == config["r"]
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {} and not config["use_rslora"]
    else:
        assert config["rank_pattern"] and all(ranks[p] == b for p, b in config["rank_pattern"].items())
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with qdylora.at_rank(model, allocation):
            ours = model(input_ids=x).logits
        with qdylora.at_rank(model, 8):
            assert (model(input_ids=x).logits - ours).abs().max() > 1e-2  # not the full adapter
        peft4 = peft.PeftModel.from_pretrained(transformers_4bit(path, torch.float32), out).eval()
        lora_layers = {n.removeprefix("base_model.model.") for n, m in peft4.named_modules()
                       if isinstance(m, peft.tuners.lora.LoraLayer)}
        assert lora_layers == set(used)  # rank-0 layers are not adapted
        torch.testing.assert_close(peft4(input_ids=x).logits.float(), ours.float(), **LOGIT_TOL["float32"])


def test_an_allocation_that_keeps_nothing_is_refused(tiny_dir, tmp_path):
    from qdylora.core.allocation import Allocation

    model = adapted_model(tiny_dir("llama"), "nested")
    with pytest.raises(QDyLoRAError, match="keeps no component"):
        export_peft(model, Allocation.of({p: 0 for p in model.adapter_layers()}, "none"), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_peft_reproduces_rank_gains(tiny_dir, tmp_path):
    """An adapter with rank gains exports rank b with g(b) s(b) folded into lora_alpha."""
    from qdylora.core.gains import set_rank_gains

    path = tiny_dir("llama")
    model = adapted_model(path, "nested")
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    rank = 3
    with torch.no_grad(), qdylora.at_rank(model, rank):
        without = model(input_ids=x).logits
        set_rank_gains(model, [2.5 - 0.2 * k for k in range(8)])  # g(3) = 2.1
        ours = model(input_ids=x).logits
    assert (ours - without).abs().max() > 1e-2  # the gain is not a no-op
    out = export_peft(model, rank, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == pytest.approx(2.1 * 16 / 8**0.5 * rank) and not config["use_rslora"]
    with torch.no_grad():
        peft4 = peft.PeftModel.from_pretrained(transformers_4bit(path, torch.float32), out).eval()
        torch.testing.assert_close(peft4(input_ids=x).logits, ours, **LOGIT_TOL["float32"])


def test_the_peft_file_names_are_peft_own():
    from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

    from qdylora.export import PEFT_FILES

    assert PEFT_FILES == (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)
