"""QuantizedTensor: packed codes + scale + zero point + block layout, and ``dequantize()``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.core.blocks import expand_blocks, grid_shape
from lowbit.core.formats import NumberFormat, get_format
from lowbit.core.packing import pack, unpack
from lowbit.core.values import dequantize_values

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_storage(codes: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """Unsigned storage codes: ``code - qmin`` for ints, the index or the raw bits otherwise."""
    if fmt.kind == "float":
        return codes.view(torch.uint8)
    if fmt.kind == "int" and fmt.signed:
        return (codes.to(torch.int16) - fmt.qmin).to(torch.uint8)
    return codes.to(torch.uint8)


def from_storage(stored: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    if fmt.kind == "float":
        return stored.view(fmt.float_dtype)
    if fmt.kind == "int" and fmt.signed:
        return (stored.to(torch.int16) + fmt.qmin).to(fmt.code_dtype)
    return stored


@dataclass
class QuantizedTensor:
    """A quantized tensor in lowbit's one canonical layout.

    qdata:       uint8, storage codes packed along the last dim (``packing.py``)
    scale:       one per block, shape ``grid_shape(shape, block_size)``
    zero_point:  same shape as scale, or None (symmetric). Integer zero points are in the code
                 domain; float zero points (HQQ) are in units of the scale.
    format:      the code format (``uint4`` for asymmetric int4)
    block_size:  elements sharing a scale along each dim (ragged last blocks allowed)
    shape:       original shape; dtype: original dtype
    group_index: optional, for the last dim: column k uses group ``group_index[k]`` instead of
                 ``k // block_size[-1]`` (GPTQ act-order without static groups)

    Two-level scales (llama.cpp's k-quants), when ``super_scale`` is set:
    scale:       integer codes of ``scale_format`` (e.g. uint6), one per group; the group's scale
                 is ``scale * super_scale`` with one float16 ``super_scale`` per ``super_block``
                 columns of a row (shape ``(rows, ceil(columns / super_block))``)
    zero_point:  None (symmetric), or integer codes of the group minimums m, each
                 ``zero_point * super_min``; values are then ``code * scale - m`` (a minimum,
                 not a zero point: Q4_K / Q5_K / Q2_K)
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    format: NumberFormat
    block_size: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    group_index: torch.Tensor | None = None
    super_scale: torch.Tensor | None = None
    super_min: torch.Tensor | None = None
    scale_format: NumberFormat | None = None
    super_block: int | None = None

    STORED_FIELDS: ClassVar[tuple[str, ...]] = (
        "qdata", "scale", "zero_point", "group_index", "super_scale", "super_min")
    """The tensor fields, in the order they are stored (``tensors()``)."""

    @classmethod
    def from_codes(
        cls, codes, scale, zero_point, fmt: NumberFormat, block_size, dtype, group_index=None,
        two_level=None,
    ) -> QuantizedTensor:
        """Pack ``codes``. With ``two_level`` (``lowbit.core.superblock.TwoLevelScales``), the
        scale and zero point come from it and ``scale`` / ``zero_point`` must be None."""
        block_size = tuple(block_size)
        expected = grid_shape(codes.shape, block_size)
        if group_index is not None:
            expected = expected[:-1] + (int(group_index.max()) + 1,)
        if two_level is not None:
            if scale is not None or zero_point is not None or group_index is not None:
                raise ValueError("two-level scales replace scale and zero_point (and allow no group_index)")
            scale, zero_point = two_level.scale_codes, two_level.min_codes
        if tuple(scale.shape) != expected:
            raise ValueError(f"scale shape {tuple(scale.shape)} does not match blocks {expected}")
        if zero_point is not None and zero_point.shape != scale.shape:
            raise ValueError("zero_point must have the scale's shape")
        qdata = pack(to_storage(codes, fmt), fmt.bits)
        if two_level is None:
            return cls(qdata, scale, zero_point, fmt, block_size, tuple(codes.shape), dtype, group_index)
        return cls(qdata, scale, zero_point, fmt, block_size, tuple(codes.shape), dtype, None,
                   two_level.super_scale, two_level.super_min, two_level.scale_format, two_level.super_block)

    @property
    def two_level(self) -> bool:
        return self.super_scale is not None

    def group_scales(self) -> torch.Tensor:
        """The scale of each group (block) as float32, shape ``scale.shape``."""
        if self.super_scale is None:
            return self.scale.float()
        return self.scale.float() * self._per_group(self.super_scale)

    def group_minimums(self) -> torch.Tensor | None:
        """Two-level asymmetric tensors: each group's minimum m (float32), else None."""
        if self.super_min is None:
            return None
        return self.zero_point.float() * self._per_group(self.super_min)

    def _per_group(self, t: torch.Tensor) -> torch.Tensor:
        per = self.super_block // self.block_size[-1]
        return t.float().repeat_interleave(per, dim=-1)[..., : self.scale.shape[-1]]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def codes(self) -> torch.Tensor:
        """Unpacked codes in the format's own domain, shape ``self.shape``."""
        return from_storage(unpack(self.qdata, self.format.bits, self.shape[-1]), self.format)

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """A per-block tensor (scale or zero point) repeated to the full shape."""
        if self.group_index is not None:
            t = expand_blocks(t, self.block_size[:-1] + (1,), self.shape[:-1] + (t.shape[-1],))
            return t[..., self.group_index.long()]
        return expand_blocks(t, self.block_size, self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.super_scale is not None:
            m = self.group_minimums()
            out = dequantize_values(self.codes(), self.expand(self.group_scales()), None, self.format,
                                    minimum=None if m is None else self.expand(m))
            return out.to(dtype or self.dtype)
        zp = None if self.zero_point is None else self.expand(self.zero_point)
        out = dequantize_values(self.codes(), self.expand(self.scale), zp, self.format)
        return out.to(dtype or self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes as stored: packed codes, scales, zero points (packed when integer), index."""
        if self.super_scale is not None:
            return sum(t.numel() * t.element_size() for t in self.tensors().values())
        n = self.qdata.numel() + self.scale.numel() * self.scale.element_size()
        if self.zero_point is not None:
            n += _zero_point_storage(self.zero_point, self.format).numel() * (
                1 if not self.zero_point.is_floating_point() else self.zero_point.element_size()
            )
        if self.group_index is not None:
            n += self.group_index.numel() * 4
        return n

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def to(self, device) -> QuantizedTensor:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedTensor(
            self.qdata.to(device), self.scale.to(device), move(self.zero_point), self.format,
            self.block_size, self.shape, self.dtype, move(self.group_index),
            move(self.super_scale), move(self.super_min), self.scale_format, self.super_block,
        )

    # -- serialisation: tensors for safetensors, the rest as JSON metadata --------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.super_scale is not None:  # integer scale (and minimum) codes, packed
            out = {"qdata": self.qdata, "scale": _zero_point_storage(self.scale, self.scale_format),
                   "super_scale": self.super_scale}
            if self.zero_point is not None:
                out["zero_point"] = _zero_point_storage(self.zero_point, self.scale_format)
                out["super_min"] = self.super_min
            return out
        out = {"qdata": self.qdata, "scale": self.scale}
        if self.zero_point is not None:
            out["zero_point"] = _zero_point_storage(self.zero_point, self.format)
        if self.group_index is not None:
            out["group_index"] = self.group_index.to(torch.int32)
        return out

    def metadata(self) -> dict:
        if self.super_scale is not None:
            return {
                "format": self.format.name, "block_size": list(self.block_size), "shape": list(self.shape),
                "dtype": str(self.dtype).removeprefix("torch."),
                "zero_point": None if self.zero_point is None else "minimum",
                "scale_format": self.scale_format.name, "super_block": self.super_block,
            }
        return {
            "format": self.format.name,
            "block_size": list(self.block_size),
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "zero_point": None if self.zero_point is None else (
                "float" if self.zero_point.is_floating_point() else "int"),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> QuantizedTensor:
        fmt = get_format(meta["format"])
        scale = tensors["scale"]
        zp = tensors.get("zero_point")
        if meta.get("super_block"):
            sfmt = get_format(meta["scale_format"])
            grid = grid_shape(tuple(meta["shape"]), tuple(meta["block_size"]))
            scale = from_storage(unpack(scale, sfmt.bits, grid[-1]), sfmt)
            if zp is not None:
                zp = from_storage(unpack(zp, sfmt.bits, grid[-1]), sfmt)
            return cls(
                tensors["qdata"], scale, zp, fmt, tuple(meta["block_size"]), tuple(meta["shape"]),
                DTYPES[meta["dtype"]], None, tensors["super_scale"], tensors.get("super_min"), sfmt,
                int(meta["super_block"]),
            )
        if zp is not None and meta.get("zero_point") == "int":
            stored = unpack(zp, fmt.bits, scale.shape[-1])
            zp = from_storage(stored, fmt)
        return cls(
            tensors["qdata"], scale, zp, fmt, tuple(meta["block_size"]), tuple(meta["shape"]),
            DTYPES[meta["dtype"]], tensors.get("group_index"),
        )


def _zero_point_storage(zero_point: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    if zero_point.is_floating_point():
        return zero_point
    return pack(to_storage(zero_point, fmt), fmt.bits)
