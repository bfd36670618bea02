"""Bit packing of unsigned b-bit codes (1 <= b <= 8) along the last dimension.

Layout (the one canonical layout; exporters and kernels repack from it): the last dimension is
padded with zeros (except for 8-bit codes, stored as they are) to a multiple of 8 codes; each
run of 8 codes c0..c7 forms the little-endian bit string ``sum(c_j << (b * j))`` of ``b``
bytes. So 4-bit codes put c0 in the low nibble of byte 0, 2-bit codes put c0..c3 in bits 0-1,
2-3, 4-5, 6-7 of byte 0, and 3-bit codes fill 3 bytes per 8 codes.
"""

from __future__ import annotations

import torch


def packed_length(n: int, bits: int) -> int:
    """Bytes used by ``n`` codes of ``bits`` bits on the last dimension."""
    if bits == 8:
        return n
    return -(-n // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any integer dtype, values in [0, 2**bits)) into uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if bits == 8:
        return codes.to(torch.uint8)
    *lead, n = codes.shape
    pad = (-n) % 8
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, -1, 8)
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1, keepdim=True)  # disjoint bits, so sum == or
    byte_shifts = torch.arange(bits, device=c.device, dtype=torch.int64) * 8
    out = (words >> byte_shifts) & 0xFF
    return out.reshape(*lead, -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 codes with the last dimension cut back to ``n``."""
    if bits == 8:
        return packed[..., :n]
    if bits == 4:  # fast path for the most common width
        lo = packed & 0x0F
        hi = packed >> 4
        return torch.stack((lo, hi), -1).flatten(-2)[..., :n]
    *lead, m = packed.shape
    p = packed.to(torch.int64).reshape(*lead, m // bits, bits)
    byte_shifts = torch.arange(bits, device=p.device, dtype=torch.int64) * 8
    words = (p << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(8, device=p.device, dtype=torch.int64) * bits
    codes = (words >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*lead, -1)[..., :n].to(torch.uint8)
