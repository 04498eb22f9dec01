"""GGUF's quantized blocks dequantized in torch, exactly as gguf-py (and ggml's dequantize_row_*)
dequantize them, so a GGUF's own weights can be the frozen base (issue 40): the raw bytes stay on
the device, and each forward and backward dequantizes one layer's weight from them.

A weight of shape (out, in) in block type T is `out * in / block_size(T)` blocks of
`type_size(T)` bytes, row-major, each row its own blocks (in is a multiple of the block size), so
the raw tensor is uint8 (out, in / block_size * type_size) and row i of it is row i of the weight.
Every function here is float32 arithmetic in the same order as gguf-py's numpy code: bit-exact
against `gguf.quants.dequantize` (tests/core/test_gguf_quants.py), on any device.

Block layouts (ggml-common.h; d, dmin: float16 scales; QK_K = 256):
    Q4_0  32 values: d, 16 bytes of 4-bit q           w = d (q - 8)
    Q4_1  32 values: d, m, 16 bytes of 4-bit q        w = d q + m
    Q5_0  32 values: d, 4 bytes of fifth bits, 16 bytes of 4-bit q    w = d (q - 16)
    Q5_1  32 values: d, m, 4 bytes of fifth bits, 16 bytes of 4-bit q w = d q + m
    Q8_0  32 values: d, 32 int8 q                     w = d q
(Q4_K_M files keep rows whose length is not a multiple of 256 in Q5_0 / Q8_0: Qwen2.5-0.5B's 896.)
    Q4_K  256: d, dmin, 12 bytes of 6-bit (scale, min) x 8, 128 bytes of 4-bit q
                                                      w = d sc_j q - dmin m_j   (sub-block j of 32)
    Q5_K  256: as Q4_K, plus 32 bytes of each q's fifth bit
    Q6_K  256: 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales, d
                                                      w = d sc_j (q - 32)      (sub-block j of 16)
"""

from __future__ import annotations

from typing import Callable

import torch

QK_K = 256
# GGML type id -> (values per block, bytes per block): gguf.GGML_QUANT_SIZES for these types
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
SIZES = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24),
         Q8_0: (32, 34), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210)}
NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1",
         Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2k) bytes -> (n, k) float32 from little-endian float16."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(q: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """(n, groups * width) bytes -> (n, groups, 2, width): low nibbles, then high ones."""
    q = q.reshape(q.shape[0], groups, 1, width)
    return torch.cat([q & 0x0F, q >> 4], dim=2)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])  # (n, 1)
    q = _nibbles(blocks[:, 2:], 1, 16).reshape(blocks.shape[0], 32)
    return d * (q.to(torch.int8) - 8).float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])  # (n, 1) each
    q = _nibbles(blocks[:, 4:], 1, 16).reshape(blocks.shape[0], 32).float()
    return d * q + m


def _five_bit(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """(n, 32) 5-bit values of Q5_0 / Q5_1 blocks whose 4 bytes of fifth bits start at `at`:
    bit i of that little-endian uint32 is bit i % 8 of its byte i // 8."""
    n = blocks.shape[0]
    qh = blocks[:, at:at + 4].reshape(n, 4, 1)
    high = ((qh >> torch.arange(8, dtype=torch.uint8, device=qh.device)) & 1).reshape(n, 32)
    low = _nibbles(blocks[:, at + 4:], 1, 16).reshape(n, 32)
    return low | (high << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])  # (n, 1)
    return d * (_five_bit(blocks, 2).to(torch.int8) - 16).float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])  # (n, 1) each
    return d * _five_bit(blocks, 4).float() + m


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])  # (n, 1)
    return blocks[:, 2:].contiguous().view(torch.int8).float() * d


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes -> the 8 sub-blocks' 6-bit scales and mins, (n, 8) each."""
    s = scales.reshape(scales.shape[0], 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]  # (n, 4) each
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d sc_j, dmin m_j) of the 8 sub-blocks, (n, 8, 1) float32 each."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])  # (n, 1)
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    return (d * sc.float()).reshape(n, 8, 1), (dmin * mn.float()).reshape(n, 8, 1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dm = _k_scales(blocks)
    q = _nibbles(blocks[:, 16:], 4, 32).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dm = _k_scales(blocks)
    qh = blocks[:, 16:48].reshape(n, 1, 1, 32)
    high = torch.cat([(qh >> i) & 1 for i in range(8)], dim=2).reshape(n, 8, 32)
    low = _nibbles(blocks[:, 48:], 4, 32).reshape(n, 8, 32)
    q = (low | (high << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16)
    d = (_f16(blocks[:, 208:210]) * scales).reshape(n, QK_K // 16, 1)
    low = _nibbles(ql, 2, 64).reshape(n, 8, 32)
    qh = qh.reshape(n, 2, 1, 32)
    high = torch.cat([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], dim=2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, 16).float()
    return (d * q).reshape(n, QK_K)


_BLOCKS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    Q4_0: _q4_0, Q4_1: _q4_1, Q5_0: _q5_0, Q5_1: _q5_1, Q8_0: _q8_0, Q4_K: _q4_k, Q5_K: _q5_k, Q6_K: _q6_k,
    F32: lambda b: b.contiguous().view(torch.float32), F16: lambda b: _f16(b),
    BF16: lambda b: b.contiguous().view(torch.bfloat16).float(),
}


def supported(qtype: int) -> bool:
    return qtype in _BLOCKS


def row_bytes(qtype: int, in_features: int) -> int:
    """Bytes of one weight row of `in_features` values in `qtype`."""
    block, size = SIZES[qtype]
    return in_features // block * size


def dequantize(raw: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    """(out, row_bytes) uint8 -> (out, in_features) float32, on raw's device."""
    block, size = SIZES[qtype]
    blocks = raw.reshape(-1, size)  # (out * in / block, size)
    return _BLOCKS[qtype](blocks).reshape(raw.shape[0], in_features)
