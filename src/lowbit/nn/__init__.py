"""Inference modules that hold quantized weights, and the kernels that compute with them."""

from lowbit.nn.kernels import KERNELS, Kernel, KernelUnsupportedError, get_kernel, register_kernel
from lowbit.nn.linear import KernelChoice, QuantizedLinear, set_kernel

__all__ = [
    "KERNELS", "Kernel", "KernelChoice", "KernelUnsupportedError", "QuantizedLinear",
    "get_kernel", "register_kernel", "set_kernel",
]
