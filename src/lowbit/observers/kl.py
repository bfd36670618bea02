"""KL (entropy) calibration: the clipping threshold whose quantized histogram of |x| diverges least.

TensorRT's entropy calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017, slide
"Entropy Calibration - pseudocode"). With ``h`` the histogram of ``|x|`` in ``B`` bins (2048) and
``L`` the format's positive levels (``2^(b-1)``, 128 for int8), for every candidate ``i`` in
``L..B``:

    P = h[0:i], with the outliers sum(h[i:]) added to P[i-1]
    Q = h[0:i] merged into L chunks of i // L bins (the last takes the rest), each chunk's mass
        spread evenly over the bins where P is non-zero, and 0 where P is 0
    divergence[i] = KL(P / sum P || Q / sum Q)

and the threshold is ``(argmin_i divergence + 0.5) * bin width``; the range is ``[-t, t]``.

Q is built from ``h[0:i]`` without the outliers, as on the slide (and in MXNet's port of it), so
clipping mass into the last bin is penalised. The divergences come from prefix sums of ``h``
instead of building P and Q for each candidate:

    KL = (sum_k p_k log p_k - sum_j Sp_j log q_j) / N - log N + log sum(h[0:i])

with ``N = sum h``, ``Sp_j`` the mass of P in chunk j and ``q_j`` the per-bin value of Q in it.
``divergence[i]`` is infinite when a chunk holds mass in P but none in Q (only the last chunk
can: its outliers).
"""

from __future__ import annotations

import logging

import torch

from lowbit.core.args import QuantArgs
from lowbit.errors import ConfigError
from lowbit.observers.base import Batch, Observer, register_observer
from lowbit.observers.histogram import BlockHistogram, check_bins

GRANULARITIES = ("tensor", "channel", "token")

logger = logging.getLogger(__name__)


def kl_divergences(counts: torch.Tensor, levels: int) -> torch.Tensor:
    """``(blocks, bins - levels + 1)`` KL(P || Q) of histograms ``counts`` ``(blocks, bins)``;
    column ``c`` is the candidate ``i = levels + c``.

    For all candidates with the same chunk width ``m = i // levels`` the first ``levels - 1``
    chunks are the same and hold no outliers, so their terms are summed once per ``m``; only the
    last chunk ``[(levels - 1) * m, i)`` depends on ``i``. Cost O(blocks * bins).
    """
    h = counts.double()
    blocks, bins = h.shape
    zero = h.new_zeros(blocks, 1)
    mass = torch.cat([zero, h.cumsum(-1)], -1)  # mass[:, k] = sum(h[:, :k])
    nonzero = torch.cat([zero, (h > 0).double().cumsum(-1)], -1)
    plogp = torch.cat([zero, torch.xlogy(h, h).cumsum(-1)], -1)
    total = mass[:, -1:]

    def at(prefix, index):  # prefix[:, index] for an index tensor of any shape
        return prefix[:, index.reshape(-1)].reshape(blocks, *index.shape)

    # First levels - 1 chunks, per width m: sum_j Sh_j log(Sh_j / nonzero bins_j).
    widths = torch.arange(1, bins // levels + 1, device=h.device)
    starts = widths[:, None] * torch.arange(levels - 1, device=h.device)  # (M, levels - 1)
    chunk_mass = at(mass, starts + widths[:, None]) - at(mass, starts)
    chunk_bins = at(nonzero, starts + widths[:, None]) - at(nonzero, starts)
    head = torch.xlogy(chunk_mass, chunk_mass / chunk_bins.clamp_min(1)).sum(-1)  # (blocks, M)

    i = torch.arange(levels, bins + 1, device=h.device)
    m = i // levels
    start = (levels - 1) * m
    inside = at(mass, i)  # sum(h[:i])
    outliers = total - inside
    last = at(h, i - 1)  # h[i-1], the bin that takes the outliers
    tail_mass = at(mass, i) - at(mass, start)  # Q's mass in the last chunk
    tail_bins = at(nonzero, i) - at(nonzero, start) + ((last == 0) & (outliers > 0)).double()
    tail_p = tail_mass + outliers  # P's mass in the last chunk
    tail = torch.where(tail_p > 0, tail_p * torch.log(tail_mass / tail_bins.clamp_min(1)), 0.0)
    cross = head[:, m - 1] + tail  # sum_j Sp_j log q_j
    sum_plogp = at(plogp, i - 1) + torch.xlogy(last + outliers, last + outliers)
    kl = (sum_plogp - cross) / total - torch.log(total) + torch.log(inside)
    return torch.where(inside > 0, kl, torch.inf).nan_to_num(nan=torch.inf, posinf=torch.inf)


def best_bins(counts: torch.Tensor, levels: int) -> torch.Tensor:
    """``(blocks,)`` the candidate bin count of least divergence (the smallest on ties)."""
    return levels + kl_divergences(counts, levels).argmin(-1)


@register_observer
class KLObserver(Observer):
    name = "kl"

    def __init__(self, args: QuantArgs, bins: int = 2048):
        super().__init__(args)
        fmt = args.code_format
        if fmt.kind != "int":
            raise ConfigError(
                f"kl observer needs a uniform integer format (int2..int8), not {args.format}; "
                "use mse or percentile"
            )
        if args.granularity not in GRANULARITIES:
            raise ConfigError(
                f"kl observer needs a histogram per tensor, channel or token, not per "
                f"{args.granularity}; use granularity {', '.join(GRANULARITIES)}, or mse"
            )
        self.levels = 1 << (args.bits - 1)
        check_bins(self.name, bins, at_least=self.levels)
        self.bins = bins
        self.histogram: BlockHistogram | None = None

    def _fold(self, batch: Batch) -> None:
        if self.histogram is None:
            self.histogram = BlockHistogram.empty(
                batch.values.shape[0], self.bins, False, batch.values.device
            )
        self.histogram.add(batch.values.abs(), batch.mask)

    def _range(self):
        values = int(self.histogram.counts.sum(-1).min())
        if values < self.bins:
            # A sparse histogram makes P and Q noisy; short weight rows at 8 bits clip badly.
            logger.warning(
                "kl observer: %d values per block for %d bins; the threshold is unreliable, "
                "prefer granularity 'tensor' or the mse observer", values, self.bins,
            )
        i = best_bins(self.histogram.counts, self.levels)
        t = (i + 0.5) * self.histogram.width()
        return -t, t

    def _state(self):
        return [] if self.histogram is None else self.histogram.tensors()
