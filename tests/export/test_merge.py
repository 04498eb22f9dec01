"""Merging one rank into the dequantized base gives a plain model with the same logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import qdylora
from qdylora.errors import QDyLoRAError
from qdylora.export.merge import is_model_file, merge

from ..conftest import COMPUTE_DTYPES, LOGIT_TOL, VOCAB, adapted_model, char_tokenizer


@pytest.mark.parametrize("dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "falcon"])
def test_merged_model_matches_the_adapter_at_that_rank(arch, dtype, tiny_dir, tmp_path):
    """Merged in the compute dtype, the plain model reproduces the adapter model's logits."""
    model = adapted_model(tiny_dir(arch), compute_dtype=dtype)
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), qdylora.at_rank(model, 5):
        ours = model(input_ids=x).logits
    with torch.no_grad(), qdylora.at_rank(model, 0):
        base = model(input_ids=x).logits
    assert (ours - base).abs().max() > 1e-2  # not a no-op
    out = merge(model, 5, tmp_path / "merged", tokenizer=char_tokenizer(), dtype=dtype)
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert (out / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype)).eval()
    assert not hasattr(loaded.config, "quantization_config")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits.float(), ours.float(), **LOGIT_TOL[dtype])


def test_merge_refuses_bad_rank_dtype_and_existing_dir(tiny_dir, tmp_path):
    model = adapted_model(tiny_dir("llama"))
    with pytest.raises(QDyLoRAError, match="outside 1..8"):
        merge(model, 9, tmp_path / "m")
    with pytest.raises(QDyLoRAError, match="dtype must be"):
        merge(model, 2, tmp_path / "m", dtype="int8")
    (tmp_path / "m").mkdir()
    with pytest.raises(QDyLoRAError, match="already exists"):
        merge(model, 2, tmp_path / "m")
    assert not list(tmp_path.glob(".m.tmp"))
    # --overwrite replaces a model directory, never a user's other files in it
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / "m" / name).write_text("old")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(QDyLoRAError, match=r"holds files qdylora did not write there \(notes.txt\)"):
        merge(model, 2, tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    assert is_model_file("model-00001-of-00002.safetensors") and is_model_file("generation_config.json")
    assert not is_model_file("model_card.md") and not is_model_file("notes.txt")


def test_merged_allocation_matches_the_adapter_under_it(tiny_dir, tmp_path):
    from qdylora.core.allocation import Allocation

    path = tiny_dir("llama")
    model = adapted_model(path, "nested")
    allocation = Allocation.of({p: (5 * i) % 9 for i, p in enumerate(model.adapter_layers())}, "mixed")
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), qdylora.at_rank(model, allocation):
        ours = model(input_ids=x).logits
    with torch.no_grad(), qdylora.at_rank(model, 8):
        assert (model(input_ids=x).logits - ours).abs().max() > 1e-2
    out = merge(model, allocation, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, ours, rtol=1e-4, atol=1e-4)


def test_merged_model_keeps_the_rank_gain(tiny_dir, tmp_path):
    from qdylora.core.gains import set_rank_gains

    model = adapted_model(tiny_dir("llama"), scaling="nested")
    set_rank_gains(model, [3.0 - 0.25 * k for k in range(8)])
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), qdylora.at_rank(model, 2):
        ours = model(input_ids=x).logits
    out = merge(model, 2, tmp_path / "merged", tokenizer=char_tokenizer(), dtype="float32")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ours, **LOGIT_TOL["float32"])
