"""Compute kernels for ``QuantizedLinear``: an explicit registry, chosen by name and logged.

A kernel is one class with four parts:

- ``name``
- ``supports(qweight, device) -> str | None``: None when it can run this weight on ``device``,
  otherwise the reason it cannot (shown to the user).
- ``prepare(qweight) -> Prepared``: a pure repack from the canonical layout
  (``lowbit.core.packing``) into the kernel's own layout, done once; tested bit-exactly.
- ``forward(x, prepared, bias)``.

Built-in kernels:

- ``dequant`` (default): any format, any device. Unpacks and dequantizes on every call, then
  ``F.linear``; memory stays packed. Only per-group scales (and zero points) are kept in float.
- ``int8``: ``aten._weight_int8pack_mm`` for int8 symmetric weights with one scale per row.
- ``int4``: ``aten._weight_int4pack_mm_for_cpu`` for int4 / uint4 weights in groups of 32..256
  (or groups those divide). CPU only: torch's CUDA int4 kernel uses another layout, not
  implemented here.
- ``int8-bf16``, ``int4-bf16``: the same, computing in bfloat16 (input rounded to bfloat16,
  output cast back). On AVX2 CPUs these are the fast ones; the float32 variants are not.
- ``cached``: dequantizes once and keeps the float weight (no memory saving; for comparison).

Which one is fastest depends on the machine (see docs/kernels.md): measure, do not assume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lowbit.core.blocks import expand_blocks
from lowbit.core.formats import get_format
from lowbit.core.registry import Registry
from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import ConfigError


class KernelUnsupportedError(ConfigError):
    """A kernel was asked to run a weight (or device) it cannot handle."""


class Kernel:
    """Base class; subclasses set ``name`` and ``Prepared`` and implement the three methods.

    ``Prepared`` is a dataclass. Its fields holding tensors (or None) become non-persistent
    buffers of the module, so they follow ``.to(device)`` and stay out of ``state_dict``; its
    other fields are plain settings (ints, strings) and must never be None.
    """

    name: ClassVar[str]
    Prepared: ClassVar[type]

    def supports(self, qweight: QuantizedTensor, device: torch.device) -> str | None:
        raise NotImplementedError

    def prepare(self, qweight: QuantizedTensor):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, prepared, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


KERNELS: Registry[Kernel] = Registry("kernel")
"""One instance of each kernel class, by name, in registration order."""


def register_kernel(cls: type[Kernel]) -> type[Kernel]:
    """Class decorator: registers one instance of ``cls`` under ``cls.name``."""
    KERNELS.add(cls.name, cls())
    return cls


def get_kernel(name: str) -> Kernel:
    return KERNELS.get(name)


# -- shared helpers ----------------------------------------------------------------------------


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Same result as ``lowbit.core.packing.unpack`` (uint8 codes, last dim cut to ``n``),
    several times faster for every width but 8.

    Widths dividing 8 never straddle bytes, so each byte is split into its low and high halves
    (low first, as the canonical layout orders them) until one code is left per byte:
    8 -> 4 -> 2 -> 1 bits. Other widths read each run of 8 codes as one ``bits``-byte word.
    """
    if bits == 8:
        return packed[..., :n]
    if 8 % bits:
        return _unpack_words(packed, bits, n)
    width = 8
    u = packed
    while width > bits:
        width //= 2
        u = _split_bytes(u, width)
    return u[..., :n]


def _unpack_words(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """8 codes from each little-endian word of ``bits`` bytes (int32 suffices for 3 bits)."""
    *lead, m = packed.shape
    b = packed.reshape(*lead, m // bits, bits)
    dtype = torch.int32 if bits <= 3 else torch.int64
    word = b[..., 0].to(dtype)
    for i in range(1, bits):
        word |= b[..., i].to(dtype) << (8 * i)
    out = torch.empty(*lead, m // bits, 8, dtype=torch.uint8, device=packed.device)
    for j in range(8):
        out[..., j] = (word >> (bits * j)) & ((1 << bits) - 1)
    return out.reshape(*lead, -1)[..., :n]


def _split_bytes(u: torch.Tensor, width: int) -> torch.Tensor:
    """Bytes holding two ``width``-bit fields -> twice as many bytes, one field each.

    In an int16, ``x | x << (8 - width)`` moves the high field to bit 8 while the low field
    stays at bit 0; the mask drops the rest. Viewed as little-endian bytes, that is
    (low, high) in order.
    """
    x = u.to(torch.int16)
    x.bitwise_or_(x << (8 - width)).bitwise_and_(((1 << width) - 1) * 0x0101)
    return x.view(torch.uint8)


def row_groups(t: torch.Tensor, qweight: QuantizedTensor) -> torch.Tensor:
    """A per-block tensor (scale or zero point) repeated over rows: ``(out_features, groups)``."""
    rows = qweight.block_size[0]
    return expand_blocks(t, (rows, 1), (qweight.shape[0], t.shape[1]))


def _cpu_only(x: torch.Tensor, name: str) -> None:
    if x.device.type != "cpu":
        raise KernelUnsupportedError(
            f"kernel {name!r} runs on CPU only, got input on {x.device}; "
            "call set_kernel('dequant') after moving the model"
        )


def _cpu_reason(device: torch.device, name: str) -> str | None:
    if torch.device(device).type != "cpu":
        return f"{name} is implemented for CPU only (torch's {device} kernels use other layouts)"
    return None


# -- dequant -----------------------------------------------------------------------------------


@dataclass
class DequantPrepared:
    """What ``dequant`` keeps beside the packed codes (the module's own ``qdata``).

    scale:   float32 ``(out_features, groups)``, one per group of ``group`` columns (ragged last)
    zero:    float32, the scale's shape, or None: asymmetric zero points (code domain)
    minimum: float32, the scale's shape, or None: two-level (k-quant) group minimums
             (value = code * scale - minimum)
    columns: int64 ``(in_features,)``: the group of each column (act-order), else None
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    minimum: torch.Tensor | None
    columns: torch.Tensor | None
    format: str
    group: int
    in_features: int


@register_kernel
class DequantKernel(Kernel):
    name = "dequant"
    Prepared = DequantPrepared

    def supports(self, qweight, device):
        return None

    def prepare(self, qweight: QuantizedTensor) -> DequantPrepared:
        zp = None if qweight.two_level else qweight.zero_point
        m = qweight.group_minimums()
        return DequantPrepared(
            qdata=qweight.qdata,
            scale=row_groups(qweight.group_scales(), qweight),
            zero=None if zp is None else row_groups(zp.float(), qweight),
            minimum=None if m is None else row_groups(m, qweight),
            columns=None if qweight.group_index is None else qweight.group_index.long(),
            format=qweight.format.name,
            group=qweight.block_size[-1],
            in_features=qweight.shape[-1],
        )

    def weight(self, p: DequantPrepared, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in ``dtype``. In float32 it equals
        ``QuantizedTensor.dequantize(torch.float32)`` bit for bit: the same operations in the
        same order, on per-group views instead of expanded scales."""
        fmt = get_format(p.format)
        u = unpack_codes(p.qdata, fmt.bits, p.in_features)
        if fmt.kind == "float":  # float8 codes are their own bits
            w = u.view(fmt.float_dtype).to(dtype)
        elif fmt.kind == "lookup":  # index_select: far faster than levels[u] on CPU
            w = fmt.levels_tensor(u.device, dtype).index_select(0, u.reshape(-1).int())
            w = w.view(u.shape)
        else:
            w = u.to(dtype)
        # Signed int codes are stored as code - qmin: subtract -qmin (exact in any float dtype).
        offset = -fmt.qmin if fmt.kind == "int" and fmt.signed else 0
        scale = p.scale.to(dtype)
        zero = None if p.zero is None else p.zero.to(dtype)
        if p.minimum is not None:  # two-level: code * scale - minimum (no group index)
            return self._minimum_form(w, scale, p.minimum.to(dtype), p)
        if p.columns is not None:  # act-order: scales per column, gathered on each call
            _affine_(w, scale[:, p.columns], None if zero is None else zero[:, p.columns], offset)
            return w
        # Whole groups as a (rows, groups, group) view, then a ragged last group on its own.
        whole = p.in_features // p.group
        if whole:
            cols = whole * p.group
            _affine_(
                w[:, :cols].unflatten(1, (whole, p.group)), scale[:, :whole, None],
                None if zero is None else zero[:, :whole, None], offset,
            )
        if whole * p.group < p.in_features:
            _affine_(
                w[:, whole * p.group:], scale[:, -1:], None if zero is None else zero[:, -1:],
                offset,
            )
        return w

    @staticmethod
    def _minimum_form(w, scale, minimum, p: DequantPrepared) -> torch.Tensor:
        whole = p.in_features // p.group
        cols = whole * p.group
        if whole:
            v = w[:, :cols].unflatten(1, (whole, p.group))
            v.mul_(scale[:, :whole, None]).sub_(minimum[:, :whole, None])
        if cols < p.in_features:
            w[:, cols:].mul_(scale[:, -1:]).sub_(minimum[:, -1:])
        return w

    def forward(self, x, prepared, bias):
        return F.linear(x, self.weight(prepared, x.dtype), bias)


def _affine_(w: torch.Tensor, scale, zero, offset: int) -> None:
    """In place: ``w = (w - zero) * scale``, with ``offset`` standing in for a missing zero."""
    if zero is not None:
        w.sub_(zero)
    elif offset:
        w.sub_(offset)
    w.mul_(scale)


# -- torch's fused weight-only matmuls (CPU) ---------------------------------------------------


class FusedKernel(Kernel):
    """A torch weight-only matmul on 2-D inputs. ``compute_dtype`` None computes in the input's
    dtype; bfloat16 rounds the input to bfloat16 (and the scales with it) and casts the output
    back: on CPUs without fast float32 paths in these kernels, that is the fast variant."""

    compute_dtype: ClassVar[torch.dtype | None] = None

    def matmul(self, x: torch.Tensor, prepared) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, prepared, bias):
        _cpu_only(x, self.name)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        if self.compute_dtype is not None:
            x2 = x2.to(self.compute_dtype)
        out = self.matmul(x2, prepared).to(x.dtype)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


# -- int8: torch's weight-only int8 matmul ------------------------------------------------------


@dataclass
class Int8Prepared:
    """weight: int8 codes ``(out_features, in_features)``; scale: float32 ``(out_features,)``."""

    weight: torch.Tensor
    scale: torch.Tensor


@register_kernel
class Int8Kernel(FusedKernel):
    name = "int8"
    Prepared = Int8Prepared

    def supports(self, qweight, device):
        fmt = qweight.format
        if fmt.name != "int8":
            return f"{self.name} needs symmetric int8 codes, got {fmt.name}"
        if qweight.two_level:
            return f"{self.name} cannot run two-level (k-quant) scales"
        if qweight.zero_point is not None or qweight.group_index is not None:
            return f"{self.name} needs symmetric codes without a zero point or group index"
        if qweight.scale.shape[-1] != 1:
            return f"{self.name} needs one scale per output row, got blocks of {qweight.block_size}"
        return _cpu_reason(device, self.name)

    def prepare(self, qweight: QuantizedTensor) -> Int8Prepared:
        return Int8Prepared(
            weight=qweight.codes().contiguous(),
            scale=row_groups(qweight.scale.float(), qweight)[:, 0].contiguous(),
        )

    def matmul(self, x, prepared):
        return torch.ops.aten._weight_int8pack_mm(x, prepared.weight, prepared.scale.to(x.dtype))


@register_kernel
class Int8Bf16Kernel(Int8Kernel):
    name = "int8-bf16"
    compute_dtype = torch.bfloat16


# -- int4: torch's weight-only int4 matmul (tinygemm layout, CPU variant) ----------------------

INT4_GROUPS = (256, 128, 64, 32)
"""Group sizes ``_weight_int4pack_mm_for_cpu`` accepts, largest (fastest) first."""


@dataclass
class Int4Prepared:
    """packed: torch's opaque CPU int4 layout; scales_and_zeros: float32 ``(K / group, N, 2)``."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group: int


def int4_group(qweight: QuantizedTensor) -> int | None:
    """The kernel's group size: the largest accepted size dividing both the weight's group and
    ``in_features``. A larger or ragged group is served by repeating its scale over several
    kernel groups (576 columns in groups of 128 -> kernel groups of 64), which is exact."""
    common = math.gcd(qweight.block_size[-1], qweight.shape[-1])
    return next((g for g in INT4_GROUPS if common % g == 0), None)


def int4_codes(qweight: QuantizedTensor) -> torch.Tensor:
    """int32 codes ``q`` in 0..15 with weight = (q - 8) * scale + zero, as the kernel computes.

    These are the canonical storage codes unchanged: signed int4 is stored as ``c + 8`` and
    uint4 as ``u``."""
    return unpack_codes(qweight.qdata, 4, qweight.shape[-1]).to(torch.int32)


def int4_scales_and_zeros(qweight: QuantizedTensor, group: int) -> torch.Tensor:
    """float32 ``(K / group, N, 2)``. Symmetric: (scale, 0). Asymmetric, w = (u - z) * s
    = (u - 8) * s + (8 - z) * s, so zero = (8 - z) * s."""
    n, k = qweight.shape
    scale = row_groups(qweight.scale.float(), qweight)
    zero = torch.zeros_like(scale)
    if qweight.zero_point is not None:
        zero = (8 - row_groups(qweight.zero_point.float(), qweight)) * scale
    # kernel group j covers columns j*group.. and so belongs to weight group (j*group) // block
    owner = torch.arange(0, k, group, device=scale.device) // qweight.block_size[-1]
    return torch.stack((scale[:, owner], zero[:, owner]), -1).transpose(0, 1).contiguous()


@register_kernel
class Int4Kernel(FusedKernel):
    name = "int4"
    Prepared = Int4Prepared

    def supports(self, qweight, device):
        fmt = qweight.format
        if fmt.name not in ("int4", "uint4"):
            return f"{self.name} needs int4 or uint4 codes, got {fmt.name}"
        if qweight.two_level:
            return f"{self.name} cannot run two-level (k-quant) scales"
        if qweight.group_index is not None:
            return f"{self.name} cannot follow a group index (act-order)"
        n, k = qweight.shape
        if n % 16:
            return f"{self.name} needs out_features divisible by 16, got {n}"
        if int4_group(qweight) is None:
            return (
                f"{self.name} needs a group of {', '.join(map(str, INT4_GROUPS))} dividing both the "
                f"weight's group ({qweight.block_size[-1]}) and in_features ({k})"
            )
        return _cpu_reason(device, self.name)

    def prepare(self, qweight: QuantizedTensor) -> Int4Prepared:
        group = int4_group(qweight)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4_codes(qweight), 2)
        return Int4Prepared(packed, int4_scales_and_zeros(qweight, group), group)

    def matmul(self, x, prepared):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, prepared.packed, prepared.group, prepared.scales_and_zeros.to(x.dtype)
        )


@register_kernel
class Int4Bf16Kernel(Int4Kernel):
    name = "int4-bf16"
    compute_dtype = torch.bfloat16


# -- cached: the float weight, dequantized once ------------------------------------------------


@dataclass
class CachedPrepared:
    weight: torch.Tensor


@register_kernel
class CachedKernel(Kernel):
    name = "cached"
    Prepared = CachedPrepared

    def supports(self, qweight, device):
        return None

    def prepare(self, qweight: QuantizedTensor) -> CachedPrepared:
        return CachedPrepared(qweight.dequantize())

    def forward(self, x, prepared, bias):
        return F.linear(x, prepared.weight.to(x.dtype), bias)
