"""Two-level scales (llama.cpp's k-quants): group scales and minimums stored as small integer
codes times one float16 scale per super-block.

For a row split into groups g (e.g. 32 columns) inside super-blocks S (256 columns), with the
per-group float scale s_g and minimum m_g = -min(x_g, 0) from a range:

    d    = max_{g in S} s_g / Smax        (float16)     sc_g = round(s_g / d)   in [0, Smax]
    dmin = max_{g in S} m_g / Smax        (float16)     mc_g = round(m_g / dmin) in [0, Smax]
    value = code * (d * sc_g) - dmin * mc_g             (asymmetric: Q4_K, Q5_K, Q2_K)
    value = code * (d * sc_g)                           (symmetric:  Q6_K, Q3_K)

Smax is the largest positive code of ``scale_format`` (63 for uint6, 127 for int8, 31 for
int6). The group scale and minimum are then exactly float32 products, so what is saved or
written to GGUF reproduces the values bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.args import QuantArgs
from lowbit.core.formats import NumberFormat, get_format


@dataclass
class TwoLevelScales:
    scale_codes: torch.Tensor
    """(rows, groups), ``scale_format``'s code dtype."""
    super_scale: torch.Tensor
    """(rows, super-blocks), float16."""
    min_codes: torch.Tensor | None
    super_min: torch.Tensor | None
    scale_format: NumberFormat
    super_block: int
    group_size: int

    def _per_group(self, t: torch.Tensor) -> torch.Tensor:
        per = self.super_block // self.group_size
        return t.float().repeat_interleave(per, dim=-1)[..., : self.scale_codes.shape[-1]]

    def scale(self) -> torch.Tensor:
        """float32 scale of each group: d * sc."""
        return self.scale_codes.float() * self._per_group(self.super_scale)

    def minimum(self) -> torch.Tensor | None:
        """float32 minimum of each group (dmin * mc), or None (symmetric)."""
        if self.min_codes is None:
            return None
        return self.min_codes.float() * self._per_group(self.super_min)


def two_level_qparams(xmin: torch.Tensor, xmax: torch.Tensor, args: QuantArgs) -> TwoLevelScales:
    """Two-level scales for per-group ranges ``xmin``, ``xmax`` (shape (rows, groups))."""
    fmt = args.code_format
    sfmt = get_format(args.scale_format)
    smax = float(sfmt.qmax)
    xmin = xmin.float().clamp(max=0)
    xmax = xmax.float().clamp(min=0)
    if args.symmetric:
        scale = torch.maximum(xmin.abs(), xmax) / fmt.max_value
        minimum = None
    else:
        scale = (xmax - xmin) / (fmt.qmax - fmt.qmin)
        minimum = -xmin
    per = args.super_block // args.group_size
    sc, d = _quantize_positive(scale, per, smax, sfmt)
    mc = dm = None
    if minimum is not None:
        mc, dm = _quantize_positive(minimum, per, smax, sfmt)
    return TwoLevelScales(sc, d, mc, dm, sfmt, args.super_block, args.group_size)


def _quantize_positive(values: torch.Tensor, per: int, smax: float, sfmt: NumberFormat):
    """Codes in [0, smax] and one float16 scale per ``per`` consecutive groups."""
    rows, groups = values.shape
    supers = -(-groups // per)
    padded = torch.nn.functional.pad(values, (0, supers * per - groups))
    top = padded.view(rows, supers, per).amax(-1)
    d = (top / smax).to(torch.float16)
    d_group = d.float().repeat_interleave(per, dim=-1)[:, :groups]
    codes = torch.where(d_group > 0, torch.round(values / d_group.clamp_min(1e-30)), 0.0)
    return codes.clamp(0, smax).to(sfmt.code_dtype), d
