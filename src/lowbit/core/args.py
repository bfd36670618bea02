"""QuantArgs: how one tensor is quantized (format, symmetry, granularity), and the short
weight grammar (``w4g128-asym``, ``nf4``, ...). A ``Scheme`` (``lowbit.core.scheme``) puts
QuantArgs for weights and activations together.

Every granularity lowers to one block-size tuple (``QuantArgs.block_size(shape)``): a block of
elements shares one scale (and zero point). Blocks that do not divide a dimension leave a ragged
last block; nothing is skipped or silently regrouped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from lowbit.core.formats import NumberFormat, get_format
from lowbit.core.records import from_dict, to_dict
from lowbit.errors import ConfigError

GRANULARITIES = ("tensor", "channel", "group", "token", "block")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class QuantArgs:
    format: str = "int4"
    """int2..int8, nf4, fp4, fp8_e4m3, fp8_e5m2 (asymmetric int uses unsigned codes)."""
    symmetric: bool = True
    granularity: str = "group"
    """tensor | channel (one per output row) | group | token (one per row) | block (2-D tiles)."""
    group_size: int | None = 128
    block_shape: tuple[int, int] | None = None
    scale_dtype: str = "float16"
    observer: str = "minmax"
    """Range estimator for the scales (see ``lowbit.observers``); static scales only."""
    dynamic: bool = False
    """Activations only: scales computed from each tensor at run time (per token with
    granularity 'token'), no observer. Weights are always static."""
    super_block: int | None = None
    """Two-level scales (llama.cpp's k-quants): columns per super-block. Each group's scale (and,
    when asymmetric, its minimum, replacing the integer zero point) is stored as a
    ``scale_format`` code times one float16 scale per super-block."""
    scale_format: str | None = None
    """With ``super_block``: the int format of the group scale codes (uint6, int8, ...)."""
    signed_scale: bool = False
    """Symmetric formats whose code range is longer on one side (int4: -8..7; IQ4_NL's levels
    -127..113): let the scale be negative, so that each block's largest-magnitude value lands on
    the longer side (its code -8, not 7): a grid finer by 8/7 for int4, as llama.cpp's Q4_0 and
    IQ4_NL quantizers do. False: scale = absmax / qmax > 0."""

    def __post_init__(self):
        fmt = get_format(self.format)  # raises on unknown names
        if fmt.kind == "int" and not fmt.signed:
            raise ConfigError(
                f"format {self.format!r}: name the bit width as int{fmt.bits} and set "
                "symmetric=False for unsigned codes with a zero point"
            )
        if not self.symmetric and fmt.kind != "int":
            raise ConfigError(f"format {self.format} is symmetric only; set symmetric=True")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}"
            )
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ConfigError(f"group granularity needs group_size >= 1, got {self.group_size}")
        elif self.group_size is not None:
            raise ConfigError(f"group_size is only valid with granularity 'group', not {self.granularity!r}")
        if self.granularity == "block":
            bs = self.block_shape
            if not (isinstance(bs, tuple) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
                raise ConfigError(f"block granularity needs block_shape=(rows, cols), got {bs}")
        elif self.block_shape is not None:
            raise ConfigError("block_shape is only valid with granularity 'block'")
        if not isinstance(self.dynamic, bool):
            raise ConfigError(f"dynamic must be true or false, got {self.dynamic!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}")
        if not isinstance(self.signed_scale, bool) or (self.signed_scale and not self.symmetric):
            raise ConfigError("signed_scale must be true or false, and true only with symmetric=true")
        if self.signed_scale and self.super_block is not None:
            raise ConfigError("signed_scale is not supported with two-level scales")
        if (self.super_block is None) != (self.scale_format is None):
            raise ConfigError("two-level scales need both super_block and scale_format")
        if self.super_block is not None:
            sfmt = get_format(self.scale_format)
            if sfmt.kind != "int":
                raise ConfigError(f"scale_format must be an int format (uint6, int8, ...), got {self.scale_format}")
            if self.granularity != "group" or not isinstance(self.super_block, int) or \
                    self.super_block % self.group_size:
                raise ConfigError("two-level scales need group granularity and a super_block that is a "
                                  f"multiple of the group size, got {self.super_block} and {self.group_size}")
            if fmt.kind != "int":
                raise ConfigError(f"two-level scales need an int weight format, got {self.format}")

    @property
    def bits(self) -> int:
        return get_format(self.format).bits

    @property
    def code_format(self) -> NumberFormat:
        """The format of the stored codes: unsigned integers when asymmetric."""
        fmt = get_format(self.format)
        if fmt.kind == "int" and not self.symmetric:
            return get_format(f"uint{fmt.bits}")
        return fmt

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def block_size(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        """One block-size tuple for this granularity on a tensor of ``shape``."""
        shape = tuple(shape)
        n = len(shape)
        if n == 0:
            return ()
        if self.granularity == "tensor":
            return shape
        if self.granularity in ("channel", "token"):
            return (1,) * (n - 1) + (shape[-1],)
        if self.granularity == "group":
            return (1,) * (n - 1) + (self.group_size,)
        if n < 2:
            raise ConfigError("block granularity needs a tensor of at least 2 dimensions")
        return (1,) * (n - 2) + self.block_shape

    def name(self) -> str:
        """Short scheme name, e.g. ``w4g128``, ``w4g128-asym``, ``w8``, ``nf4g64``, ``q4_k``."""
        for gguf_name, fields in GGUF_WEIGHT_TYPES.items():  # grids the grammar cannot name
            if (fields["super_block"] or fields["signed_scale"]) and \
                    self == QuantArgs(**fields).with_(observer=self.observer):
                return gguf_name.lower() + ("" if self.observer == "minmax" else f"-{self.observer}")
        fmt = get_format(self.format)
        head = f"w{fmt.bits}" if fmt.kind == "int" else self.format
        if self.granularity == "group":
            head += f"g{self.group_size}"
        elif self.granularity == "block":
            head += f"b{self.block_shape[0]}x{self.block_shape[1]}"
        elif self.granularity == "tensor":
            head += "-tensor"
        if not self.symmetric:
            head += "-asym"
        if self.observer != "minmax" and not self.dynamic:
            head += f"-{self.observer}"
        return head

    def describe(self) -> str:
        """Format, granularity and how scales are found, e.g. ``int8 token dynamic``."""
        fmt = self.format if self.symmetric else f"{self.format} asym"
        grain = f"group {self.group_size}" if self.granularity == "group" else self.granularity
        if self.granularity == "block":
            grain = f"block {self.block_shape[0]}x{self.block_shape[1]}"
        return f"{fmt} {grain} " + ("dynamic" if self.dynamic else f"static ({self.observer})")

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantArgs:
        return from_dict(cls, data, "quantization scheme")

    def with_(self, **changes) -> QuantArgs:
        return replace(self, **changes)


def _gguf(fmt: str, group: int, symmetric: bool = True, scales: str | None = None, signed: bool = False) -> dict:
    return dict(format=fmt, symmetric=symmetric, granularity="group", group_size=group,
                super_block=256 if scales else None, scale_format=scales, signed_scale=signed)


GGUF_WEIGHT_TYPES: dict[str, dict] = {
    # llama.cpp's block types as lowbit grids (ggml-common.h): blocks of 32 with a float16
    # scale (Q*_0: symmetric codes; Q*_1: a float16 offset, which lowbit's integer zero point
    # fills up to float16 rounding); k-quants: super-blocks of 256 with 6- or 8-bit group scales.
    "Q8_0": _gguf("int8", 32),
    "Q4_0": _gguf("int4", 32, signed=True),
    "Q4_1": _gguf("int4", 32, symmetric=False),
    "Q5_0": _gguf("int5", 32, signed=True),
    "Q5_1": _gguf("int5", 32, symmetric=False),
    "IQ4_NL": _gguf("iq4nl", 32, signed=True),
    "Q2_K": _gguf("int2", 16, symmetric=False, scales="uint4"),
    "Q3_K": _gguf("int3", 16, scales="int6"),
    "Q4_K": _gguf("int4", 32, symmetric=False, scales="uint6"),
    "Q5_K": _gguf("int5", 32, symmetric=False, scales="uint6"),
    "Q6_K": _gguf("int6", 16, scales="int8"),
}
"""Weight schemes on the grids of llama.cpp's GGUF types (``--scheme q4_k``)."""


# Weight formats whose bare name means groups of this size (bitsandbytes' NF4 blocks of 64).
DEFAULT_GROUP = {"nf4": 64, "fp4": 32}

_GRAMMAR = re.compile(
    r"^(?:w(?P<bits>[2-8])|(?P<fmt>nf4|fp4|fp8_e4m3|fp8_e5m2|fp8))"
    r"(?:g(?P<group>\d+)|b(?P<brow>\d+)x(?P<bcol>\d+)|(?P<tensor>-tensor))?"
    r"(?P<asym>-asym)?(?:-(?P<observer>[a-z_]+))?$"
)

ARGS_HELP = (
    "wBITS[gGROUP|bROWSxCOLS|-tensor][-asym][-OBSERVER], nf4[gGROUP], fp4[gGROUP], fp8_e4m3, "
    "fp8_e5m2, a GGUF type (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl, q2_k..q6_k); e.g. w8, w4g128, "
    "w4g64-asym, w3g128, w2g64-asym, nf4g64, w4g128-mse, q4_k"
)


def parse_args(spec: str | dict | QuantArgs) -> QuantArgs:
    """QuantArgs from the short grammar (``ARGS_HELP``; a bare ``wN`` is per channel), a dict,
    or a QuantArgs."""
    if isinstance(spec, QuantArgs):
        return spec
    if isinstance(spec, dict):
        return QuantArgs.from_dict(spec)
    if not isinstance(spec, str):
        raise ConfigError(f"a quantization scheme must be a string or a mapping, got {spec!r}")
    key = spec.strip().lower()
    gguf_key = key.removeprefix("gguf:").upper()
    if gguf_key in GGUF_WEIGHT_TYPES:
        return QuantArgs(**GGUF_WEIGHT_TYPES[gguf_key])
    m = _GRAMMAR.match(key)
    if not m:
        raise ConfigError(f"unknown weight scheme {spec!r}: use {ARGS_HELP}")
    fmt = f"int{m['bits']}" if m["bits"] else ("fp8_e4m3" if m["fmt"] == "fp8" else m["fmt"])
    fields: dict = {"format": fmt, "symmetric": m["asym"] is None}
    if m["group"]:
        fields.update(granularity="group", group_size=int(m["group"]))
    elif m["brow"]:
        fields.update(granularity="block", group_size=None, block_shape=(int(m["brow"]), int(m["bcol"])))
    elif m["tensor"]:
        fields.update(granularity="tensor", group_size=None)
    elif fmt in DEFAULT_GROUP:
        fields.update(granularity="group", group_size=DEFAULT_GROUP[fmt])
    else:
        fields.update(granularity="channel", group_size=None)
    if m["observer"]:
        fields["observer"] = m["observer"]
    return QuantArgs(**fields)
