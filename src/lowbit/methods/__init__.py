"""Weight quantization methods, registered by name (``get_method``)."""

from lowbit.methods.base import (
    METHODS, HessianStats, InputStats, LayerResult, Method, Target, get_method, register_method,
)

__all__ = [
    "METHODS", "HessianStats", "InputStats", "LayerResult", "Method", "Target", "get_method",
    "register_method",
]
