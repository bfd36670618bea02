"""QuantizedLinear: an nn.Linear replacement that stores packed codes.

The canonical ``QuantizedTensor`` fields are buffers (``qdata``, ``scale``, ``zero_point``,
``group_index``), so ``state_dict`` holds exactly what is saved. The compute path (kernel) is
chosen explicitly; see ``lowbit.nn.kernels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.formats import get_format
from lowbit.core.tensor import QuantizedTensor


class QuantizedLinear(nn.Module):
    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.format_name = qweight.format.name
        self.block_size = tuple(qweight.block_size)
        self.weight_dtype = qweight.dtype
        self.register_buffer("qdata", qweight.qdata)
        self.register_buffer("scale", qweight.scale)
        self.register_buffer("zero_point", qweight.zero_point)
        self.register_buffer("group_index", qweight.group_index)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def qweight(self) -> QuantizedTensor:
        return QuantizedTensor(
            self.qdata, self.scale, self.zero_point, get_format(self.format_name),
            self.block_size, (self.out_features, self.in_features), self.weight_dtype,
            self.group_index,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.format_name}, block_size={self.block_size}, bias={self.bias is not None}"
        )
