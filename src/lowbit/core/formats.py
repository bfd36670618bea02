"""Number formats: the facts of each code type in one record, registered by name.

A code is what is stored for one weight. Three kinds:

- ``int``: an integer in ``[qmin, qmax]``; value = (code - zero_point) * scale.
- ``lookup``: an index into a table of levels (NF4, FP4 E2M1); value = levels[code] * scale.
- ``float``: a float8 number (E4M3, E5M2) stored as its own bits; value = code * scale.

Stored codes are unsigned (``code - qmin`` for int formats, the index for lookup formats, the
raw bits for float8), so every format packs the same way (see ``packing.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.registry import Registry
from lowbit.errors import ConfigError

# NF4 levels: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero, as published in
# QLoRA (Dettmers et al., 2023, appendix E) and used by bitsandbytes.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 E2M1 (OCP Microscaling spec): code = sign << 3 | exponent << 1 | mantissa.
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_LEVELS = _E2M1_MAGNITUDES + tuple(-m for m in _E2M1_MAGNITUDES)


# IQ4_NL: llama.cpp's non-uniform 4-bit grid (ggml-common.h, kvalues_iq4nl), used unnormalised:
# value = level * scale, with scale = block absmax / 127 for the symmetric range.
IQ4NL_LEVELS = (-127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0,
                1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0, 113.0)


@dataclass(frozen=True)
class NumberFormat:
    name: str
    bits: int
    kind: str  # "int" | "lookup" | "float"
    signed: bool = True
    levels: tuple[float, ...] | None = None
    float_dtype: torch.dtype | None = None

    @property
    def qmin(self) -> int:
        if self.kind == "int":
            return -(1 << (self.bits - 1)) if self.signed else 0
        return 0

    @property
    def qmax(self) -> int:
        if self.kind == "int":
            return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1
        return (1 << self.bits) - 1

    @property
    def max_value(self) -> float:
        """Largest magnitude a code represents before scaling (the symmetric scale divisor)."""
        if self.kind == "int":
            return float(self.qmax)
        if self.kind == "lookup":
            return max(abs(v) for v in self.levels)
        return float(torch.finfo(self.float_dtype).max)

    @property
    def code_dtype(self) -> torch.dtype:
        """dtype of unpacked codes in memory."""
        if self.kind == "float":
            return self.float_dtype
        if self.kind == "int" and self.signed:
            return torch.int8 if self.bits <= 8 else torch.int16
        return torch.uint8

    def levels_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        if self.levels is None:
            raise ConfigError(f"format {self.name} has no lookup table")
        return torch.tensor(self.levels, dtype=dtype, device=device)


FORMATS: Registry[NumberFormat] = Registry("number format")


def register_format(fmt: NumberFormat) -> NumberFormat:
    """Add ``fmt`` under its name (a name registered twice raises ValueError)."""
    return FORMATS.add(fmt.name, fmt)


for _b in range(2, 9):
    register_format(NumberFormat(f"int{_b}", _b, "int", signed=True))
    register_format(NumberFormat(f"uint{_b}", _b, "int", signed=False))
register_format(NumberFormat("nf4", 4, "lookup", signed=False, levels=NF4_LEVELS))
register_format(NumberFormat("fp4", 4, "lookup", signed=False, levels=FP4_LEVELS))
register_format(NumberFormat("iq4nl", 4, "lookup", signed=False, levels=IQ4NL_LEVELS))
register_format(NumberFormat("fp8_e4m3", 8, "float", float_dtype=torch.float8_e4m3fn))
register_format(NumberFormat("fp8_e5m2", 8, "float", float_dtype=torch.float8_e5m2))


def get_format(name: str) -> NumberFormat:
    """The format called ``name``; an unknown name is a ConfigError listing the known ones."""
    return FORMATS.get(name)
