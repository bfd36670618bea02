"""MSE: per block, the clipped range that minimises the squared error of quantizing the block.

Candidates shrink the min-max range towards zero, ``[r * xmin, r * xmax]`` for ``steps`` ratios
``r`` evenly spaced from 1.0 down to ``min_ratio``. This is the grid search of the GPTQ reference
code (IST-DASLab/gptq ``quant.py``, ``Quantizer.find_params`` with ``mse=True``: ``r = 1 - i/100``
for ``i < 80``, error ``|e|^2.4``), with the plain squared error. Each block keeps the ratio
with the least error ``sum_i (x_i - dequantize(quantize(x_i)))^2``, computed with the core
primitives and ``args``, so the choice is exactly what ``quantize`` will do; ties keep the larger
range, and ``r = 1`` is a candidate, so the error is never above min-max's on the data searched.

A single update is searched on the data itself, all blocks at once (candidates in chunks to bound
memory); a stream is searched on a signed histogram per block (bin centres weighted by counts).
"""

from __future__ import annotations

import torch

from lowbit.core.args import QuantArgs
from lowbit.core.qparams import qparams_from_range
from lowbit.core.values import dequantize_values, quantize_values
from lowbit.errors import ConfigError
from lowbit.observers.base import Batch, register_observer
from lowbit.observers.histogram import BlockHistogram, StreamingObserver

# Elements of one (candidates x blocks x elements) intermediate: 64 MiB in float32.
CHUNK_ELEMENTS = 1 << 24


def search_ratio(
    values: torch.Tensor,
    weights: torch.Tensor | None,
    xmin: torch.Tensor,
    xmax: torch.Tensor,
    ratios: torch.Tensor,
    args: QuantArgs,
) -> torch.Tensor:
    """``(blocks,)`` the ratio of least weighted squared error for ``values`` ``(blocks, n)``."""
    fmt = args.code_format
    chunk = max(1, CHUNK_ELEMENTS // values.numel())
    errors = []
    for r in ratios.split(chunk):
        scale, zero_point = qparams_from_range(r[:, None] * xmin, r[:, None] * xmax, args)
        scale = scale[..., None]
        zero_point = None if zero_point is None else zero_point[..., None]
        codes = quantize_values(values, scale, zero_point, fmt)
        error = (dequantize_values(codes, scale, zero_point, fmt) - values).pow_(2)
        if weights is not None:
            error = error.mul_(weights)
        errors.append(error.sum(-1))
    return ratios[torch.cat(errors).argmin(0)]  # argmin keeps the first (largest) on ties


@register_observer
class MSEObserver(StreamingObserver):
    name = "mse"
    signed_histogram = True  # the error of a code grid need not be symmetric (int4 -8..7, NF4)

    def __init__(self, args: QuantArgs, steps: int = 100, min_ratio: float = 0.2, bins: int = 2048):
        super().__init__(args, bins)
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"mse observer: steps must be an integer >= 1, got {steps}")
        if not 0.0 < min_ratio <= 1.0:
            raise ConfigError(f"mse observer: min_ratio must be in (0, 1], got {min_ratio}")
        self.steps = steps
        self.min_ratio = min_ratio

    def _search(self, values, weights):
        ratios = torch.linspace(1.0, self.min_ratio, self.steps, device=values.device)
        r = search_ratio(values, weights, self.xmin, self.xmax, ratios, self.args)
        return r * self.xmin, r * self.xmax

    def _range_exact(self, batch: Batch):
        return self._search(batch.values, None if batch.mask is None else batch.mask.float())

    def _range_histogram(self, histogram: BlockHistogram):
        return self._search(histogram.centers(), histogram.counts.float())
