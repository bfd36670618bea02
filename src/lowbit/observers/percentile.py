"""Percentile: clip each block's range at a percentile of its values, ignoring rare outliers.

Asymmetric: the range is the ``(100 - p)``-th and ``p``-th percentiles of x (two-sided).
Symmetric: ``[-t, t]`` with ``t`` the ``p``-th percentile of ``|x|``.
Percentile calibration of activations as in Wu et al., "Integer Quantization for Deep Learning
Inference: Principles and Empirical Evaluation" (2020), which compares 99.9 to 99.9999.

A single update is exact (linear interpolation between order statistics, as ``torch.quantile``;
sorting avoids ``torch.quantile``'s limit of 2^24 elements); a stream is summarised by a
histogram of ``bins`` bins per block.
"""

from __future__ import annotations

import torch

from lowbit.core.args import QuantArgs
from lowbit.errors import ConfigError
from lowbit.observers.base import Batch, register_observer
from lowbit.observers.histogram import BlockHistogram, StreamingObserver


def exact_quantiles(values: torch.Tensor, mask: torch.Tensor | None, qs) -> list[torch.Tensor]:
    """Per row of ``values`` ``(rows, n)``, the q-quantile of the elements where ``mask`` holds,
    for each q in ``qs``, interpolated linearly between the two nearest order statistics."""
    count = values.shape[-1] if mask is None else mask.sum(-1, keepdim=True)
    if mask is not None:
        values = values.masked_fill(~mask, float("inf"))  # sorted past the real elements
    ordered = values.sort(-1).values
    last = torch.as_tensor(count, device=values.device).expand(values.shape[0], 1) - 1
    out = []
    for q in qs:
        position = q * last.double()
        below = position.floor().long()
        above = torch.minimum(below + 1, last)
        fraction = (position - below).float()
        low, high = ordered.gather(-1, below), ordered.gather(-1, above)
        out.append((low + fraction * (high - low)).squeeze(-1))
    return out


@register_observer
class PercentileObserver(StreamingObserver):
    name = "percentile"

    def __init__(self, args: QuantArgs, percentile: float = 99.99, bins: int = 2048):
        super().__init__(args, bins)
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile observer: percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.signed_histogram = not args.symmetric

    def _range_exact(self, batch: Batch):
        q = self.percentile / 100
        if self.args.symmetric:
            (t,) = exact_quantiles(batch.values.abs(), batch.mask, [q])
            return -t, t
        low, high = exact_quantiles(batch.values, batch.mask, [1 - q, q])
        return low, high

    def _range_histogram(self, histogram: BlockHistogram):
        q = self.percentile / 100
        if self.args.symmetric:
            t = histogram.quantile(q)
            return -t, t
        return histogram.quantile(1 - q), histogram.quantile(q)
