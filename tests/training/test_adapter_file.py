"""The adapter file: exact round trip, metadata, refusing the wrong base, damaged files."""

from __future__ import annotations

import pytest
import torch

import qdylora
from qdylora import QDyLoRAConfig, QDyLoRAError

from ..conftest import VOCAB, tiny_model

CFG = dict(max_rank=8, compute_dtype="float32", dropout=0.0)


def trained(seed=0, **cfg):
    model = qdylora.prepare(tiny_model("llama"), QDyLoRAConfig(**{**CFG, **cfg}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return model.eval()


def test_round_trip_is_exact(tmp_path):
    model = trained()
    path = tmp_path / "adapter.safetensors"
    qdylora.save_adapter(model, path, extra={"step": 7})
    other = qdylora.prepare(tiny_model("llama"), QDyLoRAConfig(**{**CFG, "seed": 9}))
    meta = qdylora.load_adapter(other, path)
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(v, other.adapter_state_dict()[k])
    assert meta["extra"] == {"step": 7} and meta["config"].max_rank == 8
    assert meta["base_fingerprint"] == qdylora.base_fingerprint(model)
    x = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad(), qdylora.at_rank(model, 3), qdylora.at_rank(other.eval(), 3):
        assert torch.equal(model(input_ids=x).logits, other(input_ids=x).logits)
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left


def test_another_base_is_refused(tmp_path):
    path = tmp_path / "adapter.safetensors"
    qdylora.save_adapter(trained(), path)
    other_base = qdylora.prepare(tiny_model("llama", seed=1), QDyLoRAConfig(**CFG))
    assert qdylora.base_fingerprint(other_base) != qdylora.base_fingerprint(trained())
    with pytest.raises(QDyLoRAError, match="another base model"):
        qdylora.load_adapter(other_base, path)
    # metadata without the base's name (written by hand, or by another tool) was a KeyError
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    del meta["base_model_name_or_path"]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(QDyLoRAError, match=r"another base model \(unnamed\)"):
        qdylora.load_adapter(other_base, path)


def test_another_rank_rule_is_refused(tmp_path):
    path = tmp_path / "adapter.safetensors"
    qdylora.save_adapter(trained(scaling="standard"), path)
    with pytest.raises(QDyLoRAError, match="scaling='standard'"):
        qdylora.load_adapter(trained(scaling="rslora"), path)


def test_damaged_files(tmp_path):
    path = tmp_path / "adapter.safetensors"
    qdylora.save_adapter(trained(), path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(QDyLoRAError, match="damaged"):
        qdylora.load_adapter(trained(), cut)
    with pytest.raises(QDyLoRAError, match="does not exist"):
        qdylora.read_adapter_metadata(tmp_path / "missing.safetensors")
    other = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, other)
    with pytest.raises(QDyLoRAError, match="not a qdylora adapter"):
        qdylora.read_adapter_metadata(other)


def flip_a_data_byte(path) -> None:
    """Flip one byte of the tensor data (past safetensors' 8-byte length and JSON header)."""
    raw = bytearray(path.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header + (len(raw) - 8 - header) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_in_the_tensors_is_found(tmp_path):
    """safetensors has no checksum: a flipped byte in a tensor loaded silently."""
    path = tmp_path / "adapter.safetensors"
    qdylora.save_adapter(trained(), path)
    qdylora.load_adapter(trained(), path)  # intact: loads
    flip_a_data_byte(path)
    with pytest.raises(QDyLoRAError, match="damaged: its tensors do not match their checksum"):
        qdylora.load_adapter(trained(), path)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    qdylora.save_adapter(trained(seed=0), path)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("qdylora.training.adapter_file.save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        qdylora.save_adapter(trained(seed=1), path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_rank_gains_travel_with_the_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qdylora.core.gains import rank_gains, set_rank_gains

    model = trained(scaling="nested")
    gains = [2.0 - 0.1 * k for k in range(8)]
    set_rank_gains(model, gains)
    path = tmp_path / "adapter.safetensors"
    qdylora.save_adapter(model, path)
    other = qdylora.prepare(tiny_model("llama"), QDyLoRAConfig(**{**CFG, "scaling": "nested"}))
    set_rank_gains(other, [9.0] * 8)  # loading replaces whatever gains the model had
    qdylora.load_adapter(other, path)
    assert rank_gains(other) == pytest.approx(tuple(gains))
    x = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad(), qdylora.at_rank(model, 2), qdylora.at_rank(other.eval(), 2):
        assert torch.equal(model(input_ids=x).logits, other(input_ids=x).logits)
    set_rank_gains(model, None)
    qdylora.save_adapter(model, path)  # a file without gains: loading clears them
    qdylora.load_adapter(other, path)
    assert rank_gains(other) is None
    # damaged gains: a one-line error, not a traceback
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    for bad in ("[1, 2]", "not json", "[1, 1, 1, 1, 1, 1, 1, -1]"):
        save_file(tensors, str(path), metadata={**meta, "rank_gains": bad})
        with pytest.raises(QDyLoRAError, match="damaged: rank gains|damaged: every rank gain"):
            qdylora.load_adapter(other, path)


REPLACER = """
import sys, time
from qdylora.files import atomic_write
first, second, target = sys.argv[1:4]
blobs = [open(first, "rb").read(), open(second, "rb").read()]
print("go", flush=True)
i = 0
while True:  # a trainer's checkpoints, far more often than any: the file replaced by a rename
    with atomic_write(target) as tmp:
        tmp.write_bytes(blobs[i % 2])
    i += 1
    time.sleep(0.005)
"""


def test_reading_while_a_writer_replaces_the_file_never_mixes_two_files(tmp_path):
    """`export` during a run with --save-every 1 failed 2 in 8 with a false "tensors do not match
    their checksum": the metadata came from one file and the tensors from the next. A real
    process replaces the file by renames while this one loads it: every load is one whole file."""
    import subprocess
    import sys

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    qdylora.save_adapter(trained(seed=0), a)
    qdylora.save_adapter(trained(seed=1), b)
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(a.read_bytes())
    model = qdylora.prepare(tiny_model("llama"), QDyLoRAConfig(**CFG))
    writer = subprocess.Popen([sys.executable, "-c", REPLACER, str(a), str(b), str(target)], stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline().strip() == b"go"
        for _ in range(300):
            qdylora.load_adapter(model, target)
    finally:
        writer.kill()
        writer.wait()


def test_the_file_records_its_base_format_and_older_files_were_nf4(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "adapter.safetensors"
    qdylora.save_adapter(trained(), path)
    assert qdylora.read_adapter_metadata(path)["config"].base_format == "nf4"  # "auto" resolved by prepare
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    config = json.loads(meta["config"])
    del config["base_format"]  # as qdylora wrote it before GGUF bases
    save_file(tensors, str(path), metadata={**meta, "config": json.dumps(config)})
    assert qdylora.read_adapter_metadata(path)["config"].base_format == "nf4"
