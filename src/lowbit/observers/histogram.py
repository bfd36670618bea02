"""Fixed-size per-block histograms, and the base of observers that stream through them.

A ``BlockHistogram`` gives every block the same number of equal bins over ``[-radius, radius]``
(signed) or ``[0, radius]`` (of ``|x|``). When a batch exceeds a block's radius, the radius is
multiplied by a power of two ``k``: every edge of the new grid is an edge of the old one (the
signed range is centred on 0 and the bin count is even), so each new bin is exactly the sum of
``k`` old bins and re-binning loses no count and needs no interpolation; only the resolution of
the data seen so far drops. Counts are int64, so the sums are exact and independent of order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.core.args import QuantArgs
from lowbit.errors import ConfigError
from lowbit.observers.base import Batch, Observer

# The first radius of a block that is all zeros; any later data grows it by powers of two.
MIN_RADIUS = 2.0**-100


def check_bins(name: str, bins: int, at_least: int = 2) -> None:
    if not isinstance(bins, int) or bins < at_least or bins % 2:
        raise ConfigError(f"{name} observer: bins must be an even integer >= {at_least}, got {bins}")


@dataclass
class BlockHistogram:
    counts: torch.Tensor  # (blocks, bins) int64
    radius: torch.Tensor  # (blocks,) float32; 0 until the first batch
    signed: bool  # bins over [-radius, radius] when True, over [0, radius] (of |x|) when False

    @classmethod
    def empty(cls, blocks: int, bins: int, signed: bool, device=None) -> BlockHistogram:
        counts = torch.zeros(blocks, bins, dtype=torch.int64, device=device)
        return cls(counts, torch.zeros(blocks, device=device), signed)

    @property
    def bins(self) -> int:
        return self.counts.shape[-1]

    def lower(self) -> torch.Tensor:
        return -self.radius if self.signed else torch.zeros_like(self.radius)

    def width(self) -> torch.Tensor:
        return (2 * self.radius if self.signed else self.radius) / self.bins

    def tensors(self) -> list[torch.Tensor]:
        return [self.counts, self.radius]

    def centers(self) -> torch.Tensor:
        """``(blocks, bins)`` bin centres."""
        index = torch.arange(self.bins, device=self.counts.device) + 0.5
        return self.lower()[:, None] + index * self.width()[:, None]

    def add(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Count ``values`` ``(blocks, n)`` (already ``|x|`` for an unsigned histogram); elements
        where ``mask`` is False are not counted."""
        values = values.float()
        self._grow(values.abs().amax(-1))
        index = (values - self.lower()[:, None]) / self.width()[:, None]
        index = index.floor_().clamp_(0, self.bins - 1).long()
        weight = torch.ones_like(index) if mask is None else mask.long()
        self.counts.scatter_add_(1, index, weight)

    def _grow(self, peak: torch.Tensor) -> None:
        radius = torch.where(self.radius > 0, self.radius, peak.clamp_min(MIN_RADIUS)).double()
        peak = peak.double()
        steps = torch.ceil(torch.log2(peak / radius)).clamp_min(0)
        steps = torch.where(radius * torch.exp2(steps) < peak, steps + 1, steps)  # log2 rounding
        if bool((steps > 0).any()):
            # Beyond k = bins every old bin lands in the same one or two new bins anyway.
            cap = math.ceil(math.log2(self.bins))
            k = torch.exp2(steps.clamp(max=cap)).long()[:, None]
            j = torch.arange(self.bins, device=self.counts.device)[None]
            half = self.bins // 2
            new_index = (j + (k - 1) * half) // k if self.signed else j // k
            self.counts = torch.zeros_like(self.counts).scatter_add_(1, new_index, self.counts)
        self.radius = (radius * torch.exp2(steps)).float()

    def quantile(self, q: float) -> torch.Tensor:
        """``(blocks,)`` the q-quantile, interpolated linearly inside its bin."""
        counts = self.counts.double()
        cdf = counts.cumsum(-1)
        target = q * cdf[:, -1:]
        index = torch.searchsorted(cdf, target).clamp_(max=self.bins - 1)
        inside = counts.gather(1, index)
        before = cdf.gather(1, index) - inside
        fraction = ((target - before) / inside.clamp_min(1)).clamp_(0, 1)
        position = (index + fraction).squeeze(1)
        return (self.lower() + position * self.width()).float()


class StreamingObserver(Observer):
    """Exact on a single batch, a fixed-size histogram as soon as a second batch arrives.

    The first batch is kept (one batch of memory) so that a single update, the usual case for a
    weight, is evaluated on the data itself; a second update turns it into histogram counts.
    Subclasses implement ``_range_exact(batch)`` and ``_range_histogram(histogram)``.
    """

    signed_histogram: bool = True

    def __init__(self, args: QuantArgs, bins: int):
        super().__init__(args)
        check_bins(self.name, bins)
        self.bins = bins
        self.first: Batch | None = None
        self.histogram: BlockHistogram | None = None

    def _fold(self, batch: Batch) -> None:
        if self.batches == 0:
            # to_blocks may return a view of the caller's tensor, which the caller may reuse.
            self.first = Batch(batch.values.clone(), batch.mask, batch.min, batch.max)
            return
        if self.histogram is None:
            self.histogram = BlockHistogram.empty(
                batch.values.shape[0], self.bins, self.signed_histogram, batch.values.device
            )
            self._count(self.first)
            self.first = None
        self._count(batch)

    def _count(self, batch: Batch) -> None:
        values = batch.values if self.signed_histogram else batch.values.abs()
        self.histogram.add(values, batch.mask)

    def _range(self):
        if self.first is not None:
            return self._range_exact(self.first)
        return self._range_histogram(self.histogram)

    def _state(self):
        if self.first is not None:
            return [self.first.values, self.first.mask]
        return [] if self.histogram is None else self.histogram.tensors()

    def _range_exact(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _range_histogram(self, histogram: BlockHistogram) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError
