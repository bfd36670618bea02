"""Scale and zero point from a range, with the textbook definitions.

symmetric:  scale = absmax / qmax                 zero_point = 0 (none stored)
            (qmax = 2^(b-1) - 1 for int, the largest level for lookup and float8 formats)
            with ``signed_scale`` (codes or levels L- .. L+ longer on one side: int4 -8..7,
            IQ4_NL -127..113) the scale takes the sign that gives the finer grid:
            max(|min| / |L-|, max / L+) or, negative, -max(max / |L-|, |min| / L+), so the
            block's extreme lands on the longer side
asymmetric: scale = (max - min) / (2^b - 1)      zero_point = round(-min / scale)
            (the range is first widened to contain 0, so 0 is exactly representable)

The scale is rounded to its storage dtype before the zero point (and later the codes) are
computed from it, so what is saved reproduces what was computed bit for bit.
"""

from __future__ import annotations

import torch

from lowbit.core.args import QuantArgs


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, args: QuantArgs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    fmt = args.code_format
    xmin = xmin.float()
    xmax = xmax.float()
    tiny = torch.finfo(args.torch_scale_dtype).tiny
    if args.signed_scale:
        low, high = (min(fmt.levels), max(fmt.levels)) if fmt.kind == "lookup" else (fmt.qmin, fmt.qmax)
        lo, hi = xmin.clamp(max=0).abs(), xmax.clamp(min=0)
        positive = torch.maximum(lo / -low, hi / high)
        negative = torch.maximum(hi / -low, lo / high)
        scale = torch.where(negative < positive, -negative, positive)
        scale = torch.where(scale.abs() < tiny, torch.full_like(scale, tiny), scale)
        return scale.to(args.torch_scale_dtype), None
    if args.symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        scale = (absmax / fmt.max_value).clamp_min(tiny).to(args.torch_scale_dtype)
        return scale, None
    xmin = xmin.clamp(max=0)
    xmax = xmax.clamp(min=0)
    scale = ((xmax - xmin) / (fmt.qmax - fmt.qmin)).clamp_min(tiny).to(args.torch_scale_dtype)
    zero_point = torch.round(-xmin / scale.float()).clamp(fmt.qmin, fmt.qmax).to(fmt.code_dtype)
    return scale, zero_point
