"""Element-wise quantization of values, given a scale and zero point broadcast to the data.

Codes are in the format's own domain: signed or unsigned integers, lookup-level indices, or
float8 values. Rounding is round-half-to-even (``torch.round``), then a clamp to the range.
"""

from __future__ import annotations

import torch

from lowbit.core.formats import NumberFormat


def quantize_values(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: NumberFormat,
    minimum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes in the format's own domain (signed ints, level indices, or float8 values).
    ``minimum`` (two-level k-quant scales): codes of ``x + minimum`` instead of a zero point."""
    if minimum is not None:
        x = x.float() + minimum.float()
    y = x.float() / scale.float()
    if fmt.kind == "int":
        if zero_point is not None:
            y = y + zero_point.float()
        return torch.round(y).clamp_(fmt.qmin, fmt.qmax).to(fmt.code_dtype)
    if fmt.kind == "lookup":
        return nearest_level(y, fmt)
    limit = fmt.max_value
    return y.clamp(-limit, limit).to(fmt.float_dtype)


def nearest_level(y: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """Index of the nearest lookup level (ties go to the smaller level)."""
    levels = fmt.levels_tensor(y.device)
    ordered, order = levels.sort()
    midpoints = (ordered[1:] + ordered[:-1]) / 2
    return order[torch.bucketize(y, midpoints)].to(torch.uint8)


def dequantize_values(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: NumberFormat,
    minimum: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 values of codes: ``(code - zero_point) * scale``, or ``code * scale - minimum``."""
    if fmt.kind == "int":
        q = codes.float()
        if zero_point is not None:
            q = q - zero_point.float()
        if minimum is not None:
            return q * scale.float() - minimum.float()
        return q * scale.float()
    if fmt.kind == "lookup":
        return fmt.levels_tensor(codes.device)[codes.long()] * scale.float()
    return codes.float() * scale.float()
