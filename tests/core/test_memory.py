"""memory_report: every byte counted once, in the right part."""

from __future__ import annotations


import qdylora
from qdylora import QDyLoRAConfig
from qdylora.core.targets import block_linears

from ..conftest import tiny_model


def nf4_bytes(n: int) -> int:
    """Packed codes (4 bits) + 8-bit absmax per 64 + fp32 absmax per 64*256 + code tables (16 and
    256 fp32) + the fp32 offset, for one layer of n weights."""
    blocks = -(-n // 64)
    return n // 2 + blocks + 4 * -(-blocks // 256) + 4 * (16 + 256) + 4


def test_parts_add_up():
    full = tiny_model("llama")
    n_full = sum(p.numel() for p in full.parameters())  # the tiny Llama does not tie embeddings
    model = qdylora.prepare(full, QDyLoRAConfig(max_rank=8, compute_dtype="float32"))
    report = qdylora.memory_report(model)
    layers = model.adapter_layers().values()
    assert report.adapter.params == sum(8 * (l.in_features + l.out_features) for l in layers)
    assert report.adapter.bytes == 4 * report.adapter.params
    assert report.quantized.params == sum(l.in_features * l.out_features for l in layers)
    assert report.quantized.bytes == sum(nf4_bytes(l.in_features * l.out_features) for l in layers)
    # every original parameter is either quantized or "other"; buffers (rotary) are extra
    buffers = sum(b.numel() for b in model.buffers())
    assert report.quantized.params + report.other.params == n_full + buffers
    total = report.total
    assert total.bytes == report.quantized.bytes + report.adapter.bytes + report.other.bytes


def test_tied_embeddings_counted_once():
    full = tiny_model("gpt2")  # GPT-2 ties lm_head to wte
    assert full.lm_head.weight is full.transformer.wte.weight
    linear_weights = {id(m.weight) for m in block_linears(full).values()}
    unique = {p.data_ptr(): p for p in full.parameters() if id(p) not in linear_weights}
    expected_other = sum(p.numel() for p in unique.values()) + sum(b.numel() for b in full.buffers())
    report = qdylora.memory_report(qdylora.prepare(full, QDyLoRAConfig(max_rank=4)))
    assert report.other.params == expected_other


def test_report_renders(tiny_dir):
    report = qdylora.memory_report(qdylora.prepare(tiny_dir("llama"), QDyLoRAConfig(max_rank=8)))
    text = str(report)
    assert "frozen NF4 linears" in text and "bits/param" in text
    assert set(report.to_dict()) == {"quantized", "adapter", "other", "total"}
