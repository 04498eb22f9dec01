"""GGUF blocks dequantized in torch against gguf-py's own dequantization: bit-exact in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qdylora.core import gguf_quants as gq

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

TYPES = [gq.Q4_0, gq.Q4_1, gq.Q5_0, gq.Q5_1, gq.Q8_0, gq.Q4_K, gq.Q5_K, gq.Q6_K, gq.F16, gq.BF16, gq.F32]


def test_block_sizes_are_ggml_own():
    for t in TYPES:
        assert gq.SIZES[t] == gguf.GGML_QUANT_SIZES[Q(t)], gq.NAMES[t]
        assert gq.NAMES[t] == Q(t).name


def random_blocks(qtype: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """(rows, row_bytes) uint8: random bytes with every float16 scale a finite value (gguf-py has
    no quantizer for the K types, and random float16 bytes would be NaN or inf)."""
    rng = np.random.default_rng(seed)
    block, size = gq.SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    scales = {gq.Q4_0: [0], gq.Q4_1: [0, 2], gq.Q5_0: [0], gq.Q5_1: [0, 2], gq.Q8_0: [0], gq.Q4_K: [0, 2],
              gq.Q5_K: [0, 2], gq.Q6_K: [208],
              gq.F16: list(range(0, size, 2)), gq.BF16: [], gq.F32: []}[qtype]
    for at in scales:
        raw[:, at:at + 2] = rng.normal(0, 0.05, raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if qtype == gq.F32:
        raw = rng.normal(0, 1, rows * cols).astype(np.float32).view(np.uint8).reshape(-1, size)
    if qtype == gq.BF16:
        raw = torch.randn(rows * cols).to(torch.bfloat16).view(torch.uint8).numpy().reshape(-1, size)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: gq.NAMES[t])
def test_dequantize_is_bit_exact_against_gguf_py(qtype):
    rows, cols = 6, 512
    raw = random_blocks(qtype, rows, cols)
    expected = quants.dequantize(raw, Q(qtype)).reshape(rows, cols)  # gguf-py: float32
    ours = gq.dequantize(torch.from_numpy(raw), qtype, cols)
    assert ours.dtype == torch.float32 and ours.shape == (rows, cols)
    assert torch.isfinite(ours).all() and ours.abs().max() > 0  # not a vacuous comparison
    np.testing.assert_array_equal(ours.numpy(), expected)  # bit-exact


@pytest.mark.parametrize("qtype", [gq.Q4_0, gq.Q4_1, gq.Q5_0, gq.Q5_1, gq.Q8_0])
def test_dequantize_inverts_gguf_py_quantize(qtype):
    """Blocks gguf-py quantized from real weights (its quantizers exist for these types)."""
    w = np.random.default_rng(1).normal(0, 0.02, (4, 256)).astype(np.float32)
    raw = quants.quantize(w, Q(qtype))
    ours = gq.dequantize(torch.from_numpy(raw), qtype, 256).numpy()
    np.testing.assert_array_equal(ours, quants.dequantize(raw, Q(qtype)))
    assert np.abs(ours - w).max() < 0.02  # and they are that weight, up to the type's rounding


def test_the_embedded_gguf_s_own_tensors():
    """Every tensor type of the embedded SmolLM2 Q4_1 GGUF, read from the file, bit-exact."""
    from qdylora.data.embedded import smollm2_gguf

    assert gq.Q4_1 in file_types(smollm2_gguf())


def file_types(path) -> set[int]:
    """Compare the first rows of one tensor of each 2-D type in the GGUF file `path`, bit-exact;
    the types compared."""
    reader = gguf.GGUFReader(str(path))
    seen = set()
    for t in reader.tensors:
        qtype = int(t.tensor_type)
        if qtype in seen or not gq.supported(qtype) or len(t.shape) != 2:
            continue
        seen.add(qtype)
        cols = int(t.shape[0])  # gguf lists the fastest dimension first
        raw = np.asarray(t.data).reshape(-1, gq.row_bytes(qtype, cols))[:64]
        expected = quants.dequantize(raw, Q(qtype)).reshape(raw.shape[0], cols)
        np.testing.assert_array_equal(gq.dequantize(torch.from_numpy(raw.copy()), qtype, cols).numpy(), expected)
    return seen


def test_a_q4_k_m_file_s_own_tensors():
    """The Qwen2.5-0.5B Q4_K_M file of the studies (experiments/fetch_models.py qwen2.5-0.5b),
    when fetched: Q4_K, Q6_K, Q5_0 and Q8_0 tensors, bit-exact."""
    from qdylora.data.embedded import cache_dir

    path = cache_dir() / "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
    if not path.is_file():
        pytest.skip("the Qwen2.5-0.5B GGUF is not fetched: experiments/fetch_models.py qwen2.5-0.5b")
    assert file_types(path) >= {gq.Q4_K, gq.Q6_K, gq.Q5_0, gq.Q8_0}
