"""Block-level quantize / fake_quantize of a tensor with ``QuantArgs``."""

from __future__ import annotations

import torch

from lowbit.core.args import QuantArgs
from lowbit.core.blocks import expand_blocks, to_blocks
from lowbit.core.qparams import qparams_from_range
from lowbit.core.superblock import two_level_qparams
from lowbit.core.tensor import QuantizedTensor
from lowbit.core.values import dequantize_values, quantize_values


def block_range(x: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block min and max of ``x`` (the min-max range; observers give others)."""
    blocks = to_blocks(x.float(), args.block_size(x.shape))
    return blocks.amin(-1), blocks.amax(-1)


def quantize(
    x: torch.Tensor,
    args: QuantArgs,
    xmin: torch.Tensor | None = None,
    xmax: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` with the per-block range ``[xmin, xmax]`` (min-max when omitted)."""
    if xmin is None or xmax is None:
        xmin, xmax = block_range(x, args)
    block = args.block_size(x.shape)
    if args.super_block is not None:
        two = two_level_qparams(xmin, xmax, args)
        m = two.minimum()
        codes = quantize_values(x, expand_blocks(two.scale(), block, x.shape), None, args.code_format,
                                minimum=None if m is None else expand_blocks(m, block, x.shape))
        return QuantizedTensor.from_codes(codes, None, None, args.code_format, block, x.dtype, two_level=two)
    scale, zero_point = qparams_from_range(xmin, xmax, args)
    codes = quantize_values(
        x,
        expand_blocks(scale, block, x.shape),
        None if zero_point is None else expand_blocks(zero_point, block, x.shape),
        args.code_format,
    )
    return QuantizedTensor.from_codes(codes, scale, zero_point, args.code_format, block, x.dtype)


def fake_quantize(x: torch.Tensor, args: QuantArgs, xmin=None, xmax=None) -> torch.Tensor:
    """Quantize then dequantize, in ``x``'s dtype, without packing."""
    if xmin is None or xmax is None:
        xmin, xmax = block_range(x, args)
    if args.super_block is not None:
        return quantize(x, args, xmin, xmax).dequantize(x.dtype)
    block = args.block_size(x.shape)
    scale, zero_point = qparams_from_range(xmin, xmax, args)
    scale_e = expand_blocks(scale, block, x.shape)
    zp_e = None if zero_point is None else expand_blocks(zero_point, block, x.shape)
    codes = quantize_values(x, scale_e, zp_e, args.code_format)
    return dequantize_values(codes, scale_e, zp_e, args.code_format).to(x.dtype)
