"""The quantization core: number formats, granularity, qparams, quantize, packing, tensors."""

from lowbit.core.args import QuantArgs, parse_args
from lowbit.core.blocks import expand_blocks, grid_shape, to_blocks
from lowbit.core.formats import FORMATS, NumberFormat, get_format, register_format
from lowbit.core.packing import pack, packed_length, unpack
from lowbit.core.qparams import qparams_from_range
from lowbit.core.quantize import block_range, fake_quantize, quantize
from lowbit.core.scheme import PRESETS, Scheme, parse_scheme
from lowbit.core.tensor import QuantizedTensor
from lowbit.core.values import dequantize_values, quantize_values

__all__ = [
    "FORMATS", "PRESETS", "NumberFormat", "QuantArgs", "QuantizedTensor", "Scheme", "block_range",
    "dequantize_values", "expand_blocks", "fake_quantize", "get_format", "grid_shape", "pack",
    "packed_length", "parse_args", "parse_scheme", "qparams_from_range", "quantize", "quantize_values",
    "register_format", "to_blocks", "unpack",
]
