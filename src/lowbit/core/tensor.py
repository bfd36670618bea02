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
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    format: NumberFormat
    block_size: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    group_index: torch.Tensor | None = None

    STORED_FIELDS: ClassVar[tuple[str, ...]] = ("qdata", "scale", "zero_point", "group_index")
    """The tensor fields, in the order they are stored (``tensors()``)."""

    @classmethod
    def from_codes(
        cls, codes, scale, zero_point, fmt: NumberFormat, block_size, dtype, group_index=None
    ) -> QuantizedTensor:
        block_size = tuple(block_size)
        expected = grid_shape(codes.shape, block_size)
        if group_index is not None:
            expected = expected[:-1] + (int(group_index.max()) + 1,)
        if tuple(scale.shape) != expected:
            raise ValueError(f"scale shape {tuple(scale.shape)} does not match blocks {expected}")
        if zero_point is not None and zero_point.shape != scale.shape:
            raise ValueError("zero_point must have the scale's shape")
        qdata = pack(to_storage(codes, fmt), fmt.bits)
        return cls(qdata, scale, zero_point, fmt, block_size, tuple(codes.shape), dtype, group_index)

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
        zp = None if self.zero_point is None else self.expand(self.zero_point)
        out = dequantize_values(self.codes(), self.expand(self.scale), zp, self.format)
        return out.to(dtype or self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes as stored: packed codes, scales, zero points (packed when integer), index."""
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
        )

    # -- serialisation: tensors for safetensors, the rest as JSON metadata --------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qdata": self.qdata, "scale": self.scale}
        if self.zero_point is not None:
            out["zero_point"] = _zero_point_storage(self.zero_point, self.format)
        if self.group_index is not None:
            out["group_index"] = self.group_index.to(torch.int32)
        return out

    def metadata(self) -> dict:
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
