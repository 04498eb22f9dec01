"""GGUF export: the adapter file as llama.cpp reads it, the merged GGUF as transformers' GGUF reader
loads it (an independent reader of names, q/k order and metadata), and their agreement.

llama.cpp itself checks both on the real SmolLM2 in tests/test_real_gguf.py (slow)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import qdylora
from qdylora.core.scaling import scale
from qdylora.errors import QDyLoRAError
from qdylora.export.gguf import export_gguf_adapter, gguf_architecture, gguf_name, merge_gguf, rope_permute

from ..conftest import TINY_CONFIGS, VOCAB, adapted_model, gguf_writer, tiny_model

CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def tiny_base_gguf(arch: str, path, **config) -> str:
    """A float32 GGUF of the tiny model (with `config` changes) with the hyperparameters
    transformers' GGUF reader needs, a chat template and a token list (what a merged file must
    carry over)."""
    hf = tiny_model(arch)
    if config:
        changed = TINY_CONFIGS[arch]()
        for key, value in config.items():
            setattr(changed, key, value)
        hf = AutoModelForCausalLM.from_config(changed)
    c = hf.config
    arch_enum = gguf_architecture(hf)
    w = gguf_writer(hf, path)
    w.add_chat_template(CHAT)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    names = gguf.get_tensor_name_map(arch_enum, c.num_hidden_layers)
    for hf_name, t in hf.state_dict().items():
        t = t.float()
        w.add_tensor(gguf_name(names, hf_name), rope_permute(t, hf_name, c).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


def tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


X = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_merged_gguf_loads_in_transformers_with_the_rank_logits(arch, tiny_dir, tmp_path):
    """transformers' GGUF reader (its own names, its own undoing of llama.cpp's q/k order) loads
    our merged file to the adapter model's logits at that rank; the base's metadata came along."""
    base = tiny_base_gguf(arch, tmp_path / "base.gguf")
    model = adapted_model(tiny_dir(arch))
    with torch.no_grad(), qdylora.at_rank(model, 5):
        want = model(input_ids=X).logits
    with torch.no_grad(), qdylora.at_rank(model, 0):
        assert (want - model(input_ids=X).logits).abs().max() > 1e-2  # not a no-op
    out = merge_gguf(model, 5, tmp_path / "merged.gguf", base, dtype="float32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=X).logits, want, rtol=1e-4, atol=1e-4)
    meta = fields(out)
    assert meta["tokenizer.chat_template"] == CHAT and len(meta["tokenizer.ggml.tokens"]) == VOCAB
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert list(tensors(out)) == list(tensors(base))  # the base's tensors, in its order


@pytest.mark.parametrize("dtype,qtype,tol", [("float16", "F16", 2e-2), ("bfloat16", "BF16", 8e-2),
                                             ("q8_0", "Q8_0", 8e-2)])
def test_merged_gguf_types(dtype, qtype, tol, tiny_dir, tmp_path):
    """Matrices in the asked type (vectors stay float32, as llama.cpp writes them), still loading
    to the rank's logits within that type's rounding."""
    base = tiny_base_gguf("llama", tmp_path / "base.gguf")
    model = adapted_model(tiny_dir("llama"))
    with torch.no_grad(), qdylora.at_rank(model, 8):
        want = model(input_ids=X).logits
    out = merge_gguf(model, 8, tmp_path / "merged.gguf", base, dtype=dtype)
    kinds = {t.name: t.tensor_type.name for t in tensors(out).values()}
    assert kinds["blk.0.attn_q.weight"] == qtype and kinds["blk.0.attn_norm.weight"] == "F32"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=X).logits, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_adapter_gguf_is_the_merged_change(arch, tiny_dir, tmp_path):
    """The adapter file is what llama.cpp's loader reads (general.type adapter, adapter.type lora,
    "<base>.lora_a" ne [in, b], ".lora_b" ne [b, out]), alpha 0 (scale 1: s(b) is in lora_b), and
    lora_b @ lora_a is exactly merged(b) - merged(base) in the base GGUF's orientation: so it is
    right wherever the merged file is (the test above)."""
    base = tiny_base_gguf(arch, tmp_path / "base.gguf")
    model = adapted_model(tiny_dir(arch))
    adapter = export_gguf_adapter(model, 5, tmp_path / "adapter.gguf", dtype="float32", base_gguf=base)
    meta = fields(adapter)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 0.0 and meta["general.architecture"] == fields(base)["general.architecture"]
    pairs = tensors(adapter)
    base_tensors = tensors(base)
    assert len(pairs) == 2 * len(model.adapter_layers())
    zero = copy.deepcopy(model)
    for layer in zero.adapter_layers().values():
        layer.lora_B.data.zero_()
    with_b = tensors(merge_gguf(model, 5, tmp_path / "m5.gguf", base, dtype="float32"))
    without = tensors(merge_gguf(zero, 5, tmp_path / "m0.gguf", base, dtype="float32"))
    for name in {n.rsplit(".", 1)[0] for n in pairs}:
        a, b = pairs[name + ".lora_a"], pairs[name + ".lora_b"]
        n_in, n_out = (int(n) for n in base_tensors[name].shape)
        assert tuple(int(n) for n in a.shape) == (n_in, 5) and tuple(int(n) for n in b.shape) == (5, n_out)
        delta = np.asarray(b.data, dtype=np.float64) @ np.asarray(a.data, dtype=np.float64)  # (out, in)
        change = np.asarray(with_b[name].data, dtype=np.float64) - np.asarray(without[name].data, dtype=np.float64)
        np.testing.assert_allclose(delta, change, atol=1e-5)
        assert np.abs(delta).max() > 1e-3


@pytest.mark.parametrize("gains", [None, [3.0 - 0.25 * k for k in range(8)]])
def test_adapter_per_layer_ranks_and_scale(tiny_dir, tmp_path, gains):
    """Each layer at its own rank (llama.cpp takes each pair's rank from lora_b), rank-0 layers
    left out, g(b_l) s(b_l) folded into lora_b (with the adapter's rank gains, if any)."""
    from qdylora.core.allocation import Allocation
    from qdylora.core.gains import set_rank_gains

    model = adapted_model(tiny_dir("qwen2"), scaling="rslora")
    set_rank_gains(model, gains)
    paths = list(model.adapter_layers())
    alloc = Allocation(tuple((p, [0, 2, 8][i % 3]) for i, p in enumerate(paths)))
    out = tensors(export_gguf_adapter(model, alloc, tmp_path / "a.gguf", dtype="float32"))
    c = model.qdylora_config
    for i, (path, layer) in enumerate(model.adapter_layers().items()):
        b = [0, 2, 8][i % 3]
        name = gguf_name(gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 2), path) + ".weight"
        if b == 0:
            assert name + ".lora_a" not in out
            continue
        np.testing.assert_allclose(np.asarray(out[name + ".lora_b"].data),
                                   (layer.lora_B[:, :b] * scale(c.alpha, b, c.scaling, c.max_rank)
                                    * (gains[b - 1] if gains else 1.0)).detach().numpy(), rtol=1e-6)


def test_gguf_export_refusals(tiny_dir, tmp_path):
    base = tiny_base_gguf("llama", tmp_path / "base.gguf")
    model = adapted_model(tiny_dir("llama"))
    with pytest.raises(QDyLoRAError, match="should end in .gguf"):
        export_gguf_adapter(model, 4, tmp_path / "adapter")
    (tmp_path / "old.gguf").write_text("mine")
    with pytest.raises(QDyLoRAError, match="already exists: use --overwrite"):
        export_gguf_adapter(model, 4, tmp_path / "old.gguf")
    assert (tmp_path / "old.gguf").read_text() == "mine"
    with pytest.raises(QDyLoRAError, match="outside 1..8"):
        export_gguf_adapter(model, 9, tmp_path / "a.gguf")
    with pytest.raises(QDyLoRAError, match="is a qwen2 model, the run's base a llama one"):
        export_gguf_adapter(model, 4, tmp_path / "a.gguf", base_gguf=tiny_base_gguf("qwen2", tmp_path / "q.gguf"))
    with pytest.raises(QDyLoRAError, match="is the run's base GGUF"):
        merge_gguf(model, 4, base, base, overwrite=True)
    before = Path(base).read_bytes()
    with pytest.raises(QDyLoRAError, match="is the run's base GGUF"):  # the adapter export replaced it
        export_gguf_adapter(model, 4, base, base_gguf=base, overwrite=True)
    assert Path(base).read_bytes() == before
    with pytest.raises(QDyLoRAError, match="is a qwen2 model, the run's base a llama one"):
        merge_gguf(model, 4, tmp_path / "m.gguf", tmp_path / "q.gguf")
    wide = tiny_base_gguf("llama", tmp_path / "wide.gguf", intermediate_size=192)  # other shapes
    with pytest.raises(QDyLoRAError, match=r"ffn_gate.weight is \(64, 192\) \(ggml order\), the run.s base \(128, 64"):
        merge_gguf(model, 4, tmp_path / "m.gguf", wide)
    adapter = export_gguf_adapter(model, 4, tmp_path / "lora.gguf")  # an adapter GGUF as the base: an 18 KB copy
    with pytest.raises(QDyLoRAError, match="is a LoRA adapter, not a model"):
        merge_gguf(model, 4, tmp_path / "m.gguf", adapter)
    adapter.unlink()
    shallow = tiny_base_gguf("llama", tmp_path / "shallow.gguf", num_hidden_layers=1)  # fewer layers: dropped
    with pytest.raises(QDyLoRAError, match=r"lacks the run's adapted weights blk\.1\..*fewer layers"):
        merge_gguf(model, 4, tmp_path / "m.gguf", shallow)
    Path(shallow).unlink()
    assert len(model.adapter_layers()) == 14  # refused before anything was merged
    with pytest.raises(QDyLoRAError, match="GGUF export supports llama, mistral, qwen2 models, not gpt2"):
        export_gguf_adapter(adapted_model(tiny_dir("gpt2")), 4, tmp_path / "g.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf", "old.gguf", "q.gguf", "wide.gguf"]


def test_cli_gguf_export_and_merge(trained_run, tmp_path):
    """The commands: an adapter file and the lines that use it; a merge needs the base's GGUF
    (the tiny run's base is a directory: one line saying so, exit 2, nothing written)."""
    cli = [sys.executable, "-m", "qdylora.cli"]
    done = subprocess.run([*cli, "export", str(trained_run), "--rank", "4", "--format", "gguf",
                           "--out", str(tmp_path / "r4.gguf")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "rank 4 -> " in done.stdout and "ADAPTER " in done.stdout and "--lora" in done.stdout
    assert "came from no GGUF file" in done.stdout
    assert fields(tmp_path / "r4.gguf")["adapter.type"] == "lora"
    run = shutil.copytree(trained_run, tmp_path / "run")  # a budget writes its allocation into the run
    done = subprocess.run([*cli, "export", str(run), "--budget", "2", "--format", "gguf",
                           "--out", str(tmp_path / "budget.gguf")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ranks = {int(t.shape[0]) for n, t in tensors(tmp_path / "budget.gguf").items() if n.endswith(".lora_b")}
    assert len(ranks) > 1 and max(ranks) <= 8  # each layer at its own rank
    done = subprocess.run([*cli, "merge", str(trained_run), "--rank", "4", "--format", "gguf",
                           "--out", str(tmp_path / "m.gguf")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--base-gguf" in done.stderr
    done = subprocess.run([*cli, "export", str(trained_run), "--rank", "4", "--out", str(tmp_path / "p"),
                           "--dtype", "fp16"], capture_output=True, text=True)
    assert done.returncode == 2 and "--dtype is for --format gguf, not --format peft" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["budget.gguf", "r4.gguf", "run"]
    json.dumps(fields(tmp_path / "r4.gguf"), default=str)  # every field readable


def test_the_base_gguf_of_a_run(tiny_dir, tmp_path):
    """Where the merged file's metadata comes from: --base-gguf, the run's own .gguf, the GGUF a
    cached conversion was made from (its note, the embedded SmolLM2, a study model's file beside
    it); none for a plain model directory."""
    from qdylora.data.embedded import GGUF_SOURCE, smollm2_gguf
    from qdylora.export.gguf import base_gguf_of

    base = tiny_base_gguf("llama", tmp_path / "tiny.gguf")
    assert base_gguf_of(str(tiny_dir("llama"))) is None
    assert base_gguf_of(base) == tmp_path / "tiny.gguf"
    assert base_gguf_of(None) == base_gguf_of(str(tiny_dir("llama")), smollm2_gguf()) == Path(smollm2_gguf())
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "config.json").write_text("{}")
    (converted / GGUF_SOURCE).write_text(json.dumps({"gguf": base}))
    assert base_gguf_of(str(converted)) == Path(base)
    (converted / GGUF_SOURCE).write_text("{not json")
    assert base_gguf_of(str(converted)) is None  # then merge asks for --base-gguf in one line
    beside = tmp_path / "tiny"  # a study model: cache/<name>/ converted from cache/<name>.gguf
    beside.mkdir()
    (beside / "config.json").write_text("{}")
    assert base_gguf_of(str(beside)) == tmp_path / "tiny.gguf"
    with pytest.raises(QDyLoRAError, match="is not a .gguf file"):
        base_gguf_of(None, str(tmp_path / "converted"))
    with pytest.raises(QDyLoRAError, match="missing.gguf does not exist"):  # was "is not a .gguf file"
        base_gguf_of(None, str(tmp_path / "missing.gguf"))
