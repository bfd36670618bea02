"""Inference modules that hold quantized weights."""

from lowbit.nn.linear import QuantizedLinear

__all__ = ["QuantizedLinear"]
