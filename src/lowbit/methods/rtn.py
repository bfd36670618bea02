"""Round-to-nearest: each block's range from its observer (min-max by default), then round.

objective ``weight_mse``: mean squared weight error ||W - Q(W)||^2 / numel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.args import QuantArgs
from lowbit.core.quantize import quantize
from lowbit.methods.base import LayerResult, Quantizer, register_stage
from lowbit.observers import observed_range


def observed_quantize(weight: torch.Tensor, args: QuantArgs):
    """Quantize with the range chosen by ``args.observer``."""
    return quantize(weight, args, *observed_range(weight, args))


def weight_mse(weight: torch.Tensor, qweight) -> float:
    return float((weight.float() - qweight.dequantize(torch.float32)).pow(2).mean())


@register_stage
class RTN(Quantizer):
    name = "rtn"
    objective = "weight_mse"

    @dataclass(frozen=True)
    class Config:
        pass

    def quantize_weight(self, weight, args, stats=None) -> LayerResult:
        q = observed_quantize(weight, args)
        return LayerResult(q, weight_mse(weight, q))
