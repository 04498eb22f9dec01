"""`--base-format gguf`: the frozen linears are the GGUF file's own blocks, rows back in
transformers' order; the prepared model computes the float64 formula of the file's dequantized
weights, trains, and refuses what it cannot read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import qdylora
from qdylora.core import gguf_quants as gq
from qdylora.core.gguf_base import gguf_architecture, gguf_name, rope_permute
from qdylora.core.gguf_linear import GGUFLinear
from qdylora.errors import QDyLoRAError

from ..conftest import VOCAB, gguf_writer, tiny_model

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402


def quantized_gguf(arch: str, path, qtype: int = gq.Q8_0) -> tuple[str, AutoModelForCausalLM]:
    """A GGUF of the tiny model with its block linears in `qtype` blocks (the rest float32), and a
    float64 transformers model holding exactly the weights the file's blocks dequantize to."""
    hf = tiny_model(arch)
    c = hf.config
    arch_enum = gguf_architecture(hf)
    w = gguf_writer(hf, path)
    names = gguf.get_tensor_name_map(arch_enum, c.num_hidden_layers)
    reference = AutoModelForCausalLM.from_config(c).double().eval()
    reference.load_state_dict(hf.state_dict())
    state = reference.state_dict()
    for hf_name, t in hf.state_dict().items():
        t = rope_permute(t.float(), hf_name, c).numpy()
        if ".layers." in hf_name and hf_name.endswith("proj.weight"):
            raw = gguf.quants.quantize(t, Q(qtype))
            w.add_tensor(gguf_name(names, hf_name), raw, raw_dtype=Q(qtype))
            back = torch.from_numpy(gguf.quants.dequantize(raw, Q(qtype)))  # llama.cpp's row order
            order = rope_permute(torch.arange(back.shape[0]), hf_name, c)
            state[hf_name][order] = back.double()
        else:
            w.add_tensor(gguf_name(names, hf_name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path), reference


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # llama: q and k rows permuted in the file
@pytest.mark.parametrize("qtype", [gq.Q8_0, gq.Q4_1])
def test_the_base_is_the_file_s_blocks(arch, qtype, tmp_path):
    path, reference = quantized_gguf(arch, tmp_path / "m.gguf", qtype)
    model = qdylora.prepare(path, qdylora.QDyLoRAConfig(max_rank=4, compute_dtype="float32"), device="cpu")
    assert model.qdylora_config.base_format == "gguf"  # auto, for a .gguf model
    bases = [m.base for m in model.adapter_layers().values()]
    assert bases and all(isinstance(b, GGUFLinear) and b.qtype == qtype for b in bases)
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), qdylora.at_rank(model, 0):
        ours = model(input_ids=x).logits.double()
        ref = reference(input_ids=x).logits
    scale = ref.abs().max()
    torch.testing.assert_close(ours / scale, ref / scale, rtol=1e-4, atol=1e-4)  # float32 against float64


def test_training_on_the_blocks_moves_only_the_adapter(tmp_path):
    path, _ = quantized_gguf("llama", tmp_path / "m.gguf", gq.Q4_0)
    model = qdylora.prepare(path, qdylora.QDyLoRAConfig(max_rank=4, compute_dtype="float32"), device="cpu")
    layer = next(iter(model.adapter_layers().values()))
    raw = layer.base.raw.clone()
    with torch.no_grad():
        for m in model.adapter_layers().values():
            m.lora_B.normal_(0, 0.1)  # so A gets a gradient too
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    model(input_ids=x, labels=x).loss.backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert torch.equal(layer.base.raw, raw) and not any(p.requires_grad for p in layer.base.parameters())


def test_nf4_stays_available_and_gguf_needs_a_file(tmp_path):
    path, _ = quantized_gguf("qwen2", tmp_path / "m.gguf")
    nf4 = qdylora.prepare(path, qdylora.QDyLoRAConfig(max_rank=4, base_format="nf4", compute_dtype="float32"),
                          device="cpu")
    assert nf4.qdylora_config.base_format == "nf4"
    assert not any(isinstance(m.base, GGUFLinear) for m in nf4.adapter_layers().values())
    with pytest.raises(QDyLoRAError, match="comes from no GGUF file"):
        qdylora.prepare(tiny_model("llama"), qdylora.QDyLoRAConfig(max_rank=4, base_format="gguf"))


def test_memory_counts_the_blocks(tmp_path):
    path, _ = quantized_gguf("llama", tmp_path / "m.gguf", gq.Q4_0)
    model = qdylora.prepare(path, qdylora.QDyLoRAConfig(max_rank=4, compute_dtype="float32"), device="cpu")
    report = qdylora.memory_report(model)
    assert report.quantized.bits_per_param == pytest.approx(4.5)  # Q4_0: 18 bytes per 32 values
    assert "frozen GGUF-block linears" in str(report) and np.isfinite(report.total.bytes)


def ollama_store(tmp_path, gguf_path: str, name: str = "library/tiny", tag: str = "q8") -> str:
    """An Ollama store as `ollama pull` leaves it: a manifest naming the model layer's blob."""
    import hashlib
    import json
    import shutil

    store = tmp_path / "ollama"
    data = open(gguf_path, "rb").read()
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True)
    shutil.copy(gguf_path, store / "blobs" / f"sha256-{digest}")
    manifest = store / "manifests" / "registry.ollama.ai" / name / tag
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:00", "size": 1},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(data)}]}))
    return str(store)


def test_an_ollama_model_name_is_its_gguf_blob(tmp_path, monkeypatch):
    from qdylora.core.loading import resolve_source

    path, reference = quantized_gguf("qwen2", tmp_path / "m.gguf")
    monkeypatch.setenv("OLLAMA_MODELS", ollama_store(tmp_path, path))
    src = resolve_source("tiny:q8")
    assert src.is_local and src.gguf_file.startswith("sha256-")
    assert resolve_source("ollama:library/tiny:q8") == src
    model = qdylora.prepare("tiny:q8", qdylora.QDyLoRAConfig(max_rank=4, compute_dtype="float32"), device="cpu")
    assert model.qdylora_config.base_format == "gguf"  # a GGUF, so its own blocks
    x = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), qdylora.at_rank(model, 0):
        torch.testing.assert_close(model(input_ids=x).logits.double(), reference(input_ids=x).logits,
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(QDyLoRAError, match=r"no tiny:latest in the Ollama store .*ollama pull tiny:latest"):
        resolve_source("tiny:latest")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "none"))
    with pytest.raises(QDyLoRAError, match="no Ollama store at"):
        resolve_source("qwen2.5:0.5b")
