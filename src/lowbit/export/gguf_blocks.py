"""Pure repacking of lowbit's canonical codes into llama.cpp's block layouts (GGUF tensors).

Each ``pack_<TYPE>(qt)`` takes a ``QuantizedTensor`` on that type's grid (``QuantArgs`` of
``lowbit.core.args.GGUF_WEIGHT_TYPES``) and returns uint8 ``(rows, bytes per row)``: the row's
blocks one after the other, little-endian, as ``ggml-common.h`` declares the block structs
(llama.cpp, ggml/src/ggml-common.h; dequantizers in ggml/src/ggml-quants.c). For a block of 32:

    Q8_0   d:f16, qs:int8[32]                      x = d * q
    Q4_0   d:f16, qs:u8[16]                        x = d * (q - 8);  q_j in the low nibble of
                                                   qs[j], q_{j+16} in its high nibble
    Q4_1   d:f16, m:f16, qs:u8[16]                 x = d * q + m
    Q5_0   d:f16, qh:u32, qs:u8[16]                x = d * (q - 16); bit j of qh is q_j's bit 4
    Q5_1   d:f16, m:f16, qh:u32, qs:u8[16]         x = d * q + m
    IQ4_NL d:f16, qs:u8[16]                        x = d * kvalues[q] (nibbles as Q4_0)

Super-blocks of 256 (k-quants; sub-block scales sc and minimums mc are small integers):

    Q4_K   d, dmin:f16, scales:u8[12], qs:u8[128]          x = d*sc*q - dmin*mc, 8 x 32
    Q5_K   d, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128]
    Q6_K   ql:u8[128], qh:u8[64], scales:i8[16], d:f16     x = d*sc*(q - 32), 16 x 16
    Q3_K   hmask:u8[32], qs:u8[64], scales:u8[12], d:f16   x = d*(s - 32)*(q - 4), 16 x 16
    Q2_K   scales:u8[16], qs:u8[64], d, dmin:f16           x = d*(s & 15)*q - dmin*(s >> 4)

Where each code sits inside a super-block is spelled out in each function. lowbit's values are
the same float32 operations, so a file reproduces lowbit's dequantized weights bit for bit; the
one exception is Q4_1 / Q5_1, whose offset m = -zero_point * scale is rounded to float16
(``q1_offset_error`` measures it).
"""

from __future__ import annotations

import torch

from lowbit.core.packing import unpack
from lowbit.core.tensor import QuantizedTensor


def _f16_bytes(t: torch.Tensor) -> torch.Tensor:
    """(..., n) values -> (..., n, 2) little-endian float16 bytes."""
    return t.to(torch.float16).contiguous().view(torch.uint8).unflatten(-1, (-1, 2))


def _blocks(qt: QuantizedTensor, size: int) -> torch.Tensor:
    """Unsigned codes (code - qmin, as lowbit stores them) as (rows, blocks, size) int32."""
    stored = unpack(qt.qdata, qt.format.bits, qt.shape[-1]).to(torch.int32)
    rows, k = stored.shape
    return stored.view(rows, k // size, size)


def _nibbles(u: torch.Tensor) -> torch.Tensor:
    """(..., 32) codes < 16 -> (..., 16) bytes: q_j low nibble, q_{j+16} high nibble."""
    return (u[..., :16] | (u[..., 16:] << 4)).to(torch.uint8)


def _qh32(u: torch.Tensor) -> torch.Tensor:
    """(..., 32) 5-bit codes -> (..., 4) bytes of the little-endian u32 of their bit 4."""
    bits = ((u >> 4) & 1).to(torch.int64)
    word = (bits << torch.arange(32)).sum(-1)
    return torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], -1).to(torch.uint8)


def _rows(*parts: torch.Tensor) -> torch.Tensor:
    """Concatenate per-block byte fields and flatten the blocks of each row."""
    block = torch.cat([p.to(torch.uint8) for p in parts], -1)
    return block.flatten(1)


def pack_Q8_0(qt):
    u = unpack(qt.qdata, 8, qt.shape[-1]) ^ 0x80  # stored code + 128 -> the int8 code's byte
    return _rows(_f16_bytes(qt.scale), u.view(qt.shape[0], -1, 32))


def pack_Q4_0(qt):
    return _rows(_f16_bytes(qt.scale), _nibbles(_blocks(qt, 32)))


def pack_IQ4_NL(qt):
    return _rows(_f16_bytes(qt.scale), _nibbles(_blocks(qt, 32)))


def q1_offset(qt: QuantizedTensor) -> torch.Tensor:
    """Q4_1 / Q5_1's m = -zero_point * scale (float32, before float16 rounding)."""
    return -(qt.zero_point.float() * qt.scale.float())


def q1_offset_error(qt: QuantizedTensor) -> float:
    """Largest change of a weight caused by rounding m to float16."""
    m = q1_offset(qt)
    return float((m.to(torch.float16).float() - m).abs().max()) if m.numel() else 0.0


def pack_Q4_1(qt):
    return _rows(_f16_bytes(qt.scale), _f16_bytes(q1_offset(qt)), _nibbles(_blocks(qt, 32)))


def pack_Q5_0(qt):
    u = _blocks(qt, 32)
    return _rows(_f16_bytes(qt.scale), _qh32(u), _nibbles(u & 15))


def pack_Q5_1(qt):
    u = _blocks(qt, 32)
    return _rows(_f16_bytes(qt.scale), _f16_bytes(q1_offset(qt)), _qh32(u), _nibbles(u & 15))


# -- k-quants ----------------------------------------------------------------------------------


def _super(qt: QuantizedTensor, t: torch.Tensor, per: int) -> torch.Tensor:
    """Per-group codes (rows, groups) -> (rows, super-blocks, per) int64."""
    return t.to(torch.int64).view(qt.shape[0], -1, per)


def _k4_scales(sc: torch.Tensor, mc: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and minimums -> the 12 bytes ``get_scale_min_k4`` reads."""
    lo = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    mid = mc[..., :4] | ((mc[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 15) | ((mc[..., 4:] & 15) << 4)
    return torch.cat([lo, mid, hi], -1).to(torch.uint8)


def _k_quads(u: torch.Tensor) -> torch.Tensor:
    """(rows, supers, 256) codes < 16 -> 128 bytes: chunk i of 64 fills bytes 32i..32i+31 with
    element 64i + l in the low nibble and 64i + 32 + l in the high nibble."""
    c = u.unflatten(-1, (4, 2, 32))
    return (c[..., 0, :] | (c[..., 1, :] << 4)).flatten(-2).to(torch.uint8)


def pack_Q4_K(qt):
    u = _blocks(qt, 256)
    return _rows(_f16_bytes(qt.super_scale), _f16_bytes(qt.super_min),
                 _k4_scales(_super(qt, qt.scale, 8), _super(qt, qt.zero_point, 8)), _k_quads(u))


def pack_Q5_K(qt):
    u = _blocks(qt, 256)
    c = (u >> 4).unflatten(-1, (4, 2, 32))  # chunk i, half h: bit 2i + h of qh[l]
    shifts = (2 * torch.arange(4)[:, None] + torch.arange(2)[None, :])[..., None]
    qh = (c << shifts).sum((-3, -2))
    return _rows(_f16_bytes(qt.super_scale), _f16_bytes(qt.super_min),
                 _k4_scales(_super(qt, qt.scale, 8), _super(qt, qt.zero_point, 8)), qh, _k_quads(u & 15))


def pack_Q6_K(qt):
    u = _blocks(qt, 256).unflatten(-1, (2, 4, 32))  # half n, quarter j, l: element 128n + 32j + l
    ql = torch.cat([u[..., 0, :] & 15 | ((u[..., 2, :] & 15) << 4),
                    u[..., 1, :] & 15 | ((u[..., 3, :] & 15) << 4)], -1)  # (rows, S, 2, 64)
    qh = sum(((u[..., j, :] >> 4) & 3) << (2 * j) for j in range(4))  # (rows, S, 2, 32)
    scales = _super(qt, qt.scale, 16).to(torch.int8).view(torch.uint8)
    return _rows(ql.flatten(-2), qh.flatten(-2), scales, _f16_bytes(qt.super_scale))


def pack_Q3_K(qt):
    u = _blocks(qt, 256).unflatten(-1, (2, 4, 32))  # element 128n + 32j + l
    qs = sum((u[..., j, :] & 3) << (2 * j) for j in range(4))  # (rows, S, 2, 32)
    hbit = (u >> 2) & 1  # bit 4n + j of hmask[l]
    hmask = sum(hbit[..., n, j, :] << (4 * n + j) for n in range(2) for j in range(4))
    s = _super(qt, qt.scale, 16) + 32  # 6-bit, stored with +32
    low, high = s & 15, s >> 4
    scales = torch.cat([low[..., :8] | (low[..., 8:] << 4),
                        high[..., 0:4] | (high[..., 4:8] << 2) | (high[..., 8:12] << 4) | (high[..., 12:16] << 6)], -1)
    return _rows(hmask, qs.flatten(-2), scales, _f16_bytes(qt.super_scale))


def pack_Q2_K(qt):
    u = _blocks(qt, 256).unflatten(-1, (2, 4, 32))
    qs = sum(u[..., j, :] << (2 * j) for j in range(4))
    scales = _super(qt, qt.scale, 16) | (_super(qt, qt.zero_point, 16) << 4)
    return _rows(scales, qs.flatten(-2), _f16_bytes(qt.super_scale), _f16_bytes(qt.super_min))


def pack_float(t: torch.Tensor, type_name: str) -> torch.Tensor:
    """F32 / F16 / BF16 tensors as their own dtype."""
    return t.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[type_name]).contiguous()


PACKERS = {
    "Q8_0": pack_Q8_0, "Q4_0": pack_Q4_0, "Q4_1": pack_Q4_1, "Q5_0": pack_Q5_0, "Q5_1": pack_Q5_1,
    "IQ4_NL": pack_IQ4_NL, "Q2_K": pack_Q2_K, "Q3_K": pack_Q3_K, "Q4_K": pack_Q4_K, "Q5_K": pack_Q5_K,
    "Q6_K": pack_Q6_K,
}
