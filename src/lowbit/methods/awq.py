"""AWQ: activation-aware scales, then weight clipping, then round-to-nearest (Lin et al., 2023,
"AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

Two stages: ``awq_scale`` (a transform: returns the scales, which the pipeline folds through the
architecture's mappings) and ``awq_clip`` (a weight quantizer: clip search, then RTN). The
one-word method ``awq`` is both; ``awq+gptq`` is the scales followed by GPTQ.

Scales (section 3.2, eq. 4-5). For a ``ScaleMapping`` smooth -> balance with shared inputs X
(rows x, K channels), per-input-channel scales s > 0 are chosen to minimise

    L(s) = sum over balance linears W of || Q(W * s)(X / s)^T - W X^T ||^2

over the family s(alpha) = mean|x|^alpha / mean|w|^(1 - alpha), alpha = i / n_grid in [0, 1)
("duo scaling": mean|w| per input channel over the balance weights, each first divided by its
block absmax), normalised as s / sqrt(max(s) * min(s)). ``duo_scaling=False`` uses
s = mean|x|^alpha (the paper's eq. 5), so alpha = 0 is s = 1. s = 1 is always evaluated first
and only a strictly lower loss replaces it, so the search is never worse than RTN on L.
The pipeline folds the best s exactly (``lowbit.models.fold``): smooth output / s, balance
columns * s.

Clipping (the authors' code; not in the paper's text). Per quantization block (output row x
input group), the min-max range is shrunk by the ratio r in linspace(1, min_clip_ratio, clip_grid)
that minimises the block's contribution to the output error, || (Q_r(W) - W)_block X_block^T ||^2
on at most ``max_clip_tokens`` input rows.

Symbols in code: x = X (rows, K), x_mean = mean|x| over all calibration rows, w_mean = mean|w|
after block normalisation, s = scales, d = Q_r(W) - W.

``awq_clip``'s objective (``output_mse``) is || Q(W) X^T - W X^T ||^2 / (out_features * rows) on
the (scaled) input sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.core.args import QuantArgs
from lowbit.core.blocks import expand_blocks
from lowbit.core.names import check_patterns, name_matches
from lowbit.core.quantize import block_range, fake_quantize, quantize
from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import ConfigError
from lowbit.methods.base import (
    DEFAULT_INPUT_ROWS,
    LayerResult,
    LinearStats,
    Quantizer,
    Target,
    Transform,
    register_stage,
)
from lowbit.methods.rtn import observed_quantize

log = logging.getLogger(__name__)

# Floor for mean|x| and mean|w| before powers, so dead channels give finite scales.
_EPS = 1e-4


def _check_positive_ints(config, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"awq {name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class AWQScaleConfig:
    n_grid: int = 20
    """Grid points for alpha: i / n_grid, i < n_grid."""
    duo_scaling: bool = True
    """s = mean|x|^a / mean|w|^(1-a); False: s = mean|x|^a."""
    max_input_rows: int = DEFAULT_INPUT_ROWS
    """Input rows the pipeline keeps per linear group for the scale search."""

    def __post_init__(self):
        _check_positive_ints(self, ("n_grid", "max_input_rows"))


@dataclass(frozen=True)
class AWQClipConfig:
    clip: bool = True
    """Search a clipping ratio per quantization block; False: the scheme's observer range."""
    clip_skip: tuple[str, ...] = ("re:.*q_proj", "re:.*k_proj")
    """Linears never clipped (exact full names or ``re:`` full-match patterns): the AWQ authors
    skip q and k, whose errors the attention scores amplify."""
    max_clip_tokens: int = 512
    """Input rows used by the clip search (evenly strided over the sample)."""
    clip_grid: int = 20
    """Clip ratios tried: linspace(1.0, min_clip_ratio, clip_grid)."""
    min_clip_ratio: float = 0.5
    """Smallest fraction of the min-max range the clip search tries."""
    max_input_rows: int = DEFAULT_INPUT_ROWS
    """Input rows the pipeline keeps per linear group (the clip search strides over them)."""

    def __post_init__(self):
        _check_positive_ints(self, ("clip_grid", "max_clip_tokens", "max_input_rows"))
        if not 0 < self.min_clip_ratio <= 1:
            raise ConfigError(f"awq min_clip_ratio must be in (0, 1], got {self.min_clip_ratio}")
        object.__setattr__(self, "clip_skip", tuple(self.clip_skip))
        check_patterns(self.clip_skip, "awq clip_skip")

    def skips_clip(self, name: str) -> bool:
        return any(name_matches(p, name) for p in self.clip_skip)


@dataclass
class ScaleSearch:
    scales: torch.Tensor  # (K,) float32; all ones when no candidate beat s = 1
    alpha: float | None  # None: s = 1 won
    loss: float  # L(scales)
    identity_loss: float  # L(1): RTN's loss on the same objective


# -- scales ------------------------------------------------------------------------------------


def normalised_weight_mean(weights: list[tuple[torch.Tensor, QuantArgs]]) -> torch.Tensor:
    """mean|w| per input channel over all rows of ``weights``, each weight divided by its own
    block absmax first (so every block counts on the same scale)."""
    rows = []
    for w, args in weights:
        w = w.float()
        lo, hi = block_range(w, args)
        absmax = torch.maximum(lo.abs(), hi.abs()).clamp_min(torch.finfo(torch.float32).tiny)
        rows.append(w.abs() / expand_blocks(absmax, args.block_size(w.shape), w.shape))
    return torch.cat(rows).mean(0)


def candidate_scales(
    x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float, duo_scaling: bool
) -> torch.Tensor:
    s = x_mean.clamp_min(_EPS).pow(alpha)
    if duo_scaling:
        s = s / w_mean.clamp_min(_EPS).pow(1 - alpha)
    return s / (s.max() * s.min()).sqrt()


def scaled_loss(gram: torch.Tensor, weights: list[tuple[torch.Tensor, QuantArgs]], s: torch.Tensor) -> float:
    """L(s) with ``gram`` = X^T X: (X / s) Q(W s)^T - X W^T = X D^T with D = Q(W s) / s - W,
    so L = sum_W tr(D X^T X D^T), which costs out * K^2 instead of rows * K * out."""
    total = 0.0
    for w, args in weights:
        d = fake_quantize(w * s, args) / s - w
        total += float(((d @ gram) * d).sum())
    return total


@torch.no_grad()
def search_scales(
    x: torch.Tensor, x_mean: torch.Tensor, weights: list[tuple[torch.Tensor, QuantArgs]],
    n_grid: int = AWQScaleConfig.n_grid, duo_scaling: bool = AWQScaleConfig.duo_scaling,
) -> ScaleSearch:
    """The s (module docstring) minimising L over the alpha grid, or s = 1 if none beats it.
    ``x``: input sample (rows, K); ``x_mean``: mean|x| per channel (K,); ``weights``: the
    balance linears' weights (out, K) with their schemes."""
    x = x.float()
    gram = x.t() @ x
    weights = [(w.float().to(x.device), args) for w, args in weights]
    x_mean = x_mean.float().to(x.device)
    w_mean = normalised_weight_mean(weights) if duo_scaling else None

    ones = torch.ones_like(x_mean)
    identity = scaled_loss(gram, weights, ones)
    best = ScaleSearch(ones, None, identity, identity)
    for i in range(n_grid):
        alpha = i / n_grid
        if alpha == 0 and not duo_scaling:  # s = 1, already evaluated
            continue
        s = candidate_scales(x_mean, w_mean, alpha, duo_scaling)
        if not bool(torch.isfinite(s).all()):
            continue
        loss = scaled_loss(gram, weights, s)
        if loss < best.loss:
            best = ScaleSearch(s, alpha, loss, identity)
    return best


# -- clipping ----------------------------------------------------------------------------------


def group_grams(x: torch.Tensor, cols: int, groups: int) -> torch.Tensor:
    """X_g^T X_g for each group of ``cols`` input columns: (groups, cols, cols). A ragged last
    group is padded with zero columns, which add nothing."""
    xg = F.pad(x, (0, groups * cols - x.shape[1])).reshape(-1, groups, cols).transpose(0, 1)
    return xg.transpose(1, 2) @ xg


def block_errors(d: torch.Tensor, grams: torch.Tensor, block_rows: int) -> torch.Tensor:
    """|| d_block X_block^T ||^2 per block: (block rows, groups). ``d``: (out, K)."""
    rows = d.shape[0]
    groups, cols = grams.shape[0], grams.shape[1]
    dg = F.pad(d, (0, groups * cols - d.shape[1])).reshape(rows, groups, cols).transpose(0, 1)
    err = (torch.bmm(dg, grams) * dg).sum(-1).t()  # (rows, groups)
    if block_rows > 1:  # sum the rows of each block (padded rows add nothing)
        n = -(-rows // block_rows)
        err = F.pad(err, (0, 0, 0, n * block_rows - rows)).reshape(n, block_rows, groups).sum(1)
    return err


@torch.no_grad()
def search_clip(
    weight: torch.Tensor, x: torch.Tensor, args: QuantArgs,
    n_ratios: int = AWQClipConfig.clip_grid, min_ratio: float = AWQClipConfig.min_clip_ratio,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block range ``(xmin, xmax)`` (shape of ``block_range``): the min-max range times the
    ratio in linspace(1, min_ratio, n_ratios) with the least || d_block X_block^T ||^2.

    ``weight``: (out, K); ``x``: (rows, K). Blocks may span several output rows (2-D blocks,
    per-tensor): their error is summed over those rows. The error comes from each group's
    Gram matrix, so memory stays a few weight-sized tensors whatever the number of rows.
    """
    w = weight.float()
    block_rows, block_cols = args.block_size(w.shape)
    lo, hi = block_range(w, args)
    grams = group_grams(x.float().to(w.device), block_cols, lo.shape[1])
    best_ratio = torch.ones_like(lo)
    best_err = block_errors(fake_quantize(w, args, lo, hi) - w, grams, block_rows)
    for r in torch.linspace(1.0, min_ratio, n_ratios).tolist()[1:]:
        err = block_errors(fake_quantize(w, args, lo * r, hi * r) - w, grams, block_rows)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, r, best_ratio)
    return lo * best_ratio, hi * best_ratio


def output_error(weight: torch.Tensor, qweight: QuantizedTensor, x: torch.Tensor) -> float:
    """|| Q(W) X^T - W X^T ||^2 / (out_features * rows)."""
    w = weight.float()
    d = qweight.dequantize(torch.float32) - w
    x = x.float().to(w.device)
    return float((x @ d.t()).pow(2).sum()) / (w.shape[0] * max(1, x.shape[0]))


# -- the stages --------------------------------------------------------------------------------


@register_stage
class AWQScale(Transform):
    """The scale search; the pipeline folds what it returns."""

    name = "awq_scale"
    needs = frozenset({"inputs"})
    Config = AWQScaleConfig

    def scales(self, weights, stats: LinearStats) -> torch.Tensor | None:
        shared = stats.require("inputs", "awq")
        device = weights[0][0].device
        found = search_scales(
            shared.inputs.to(device), shared.abs_mean, weights, self.config.n_grid,
            self.config.duo_scaling,
        )
        log.debug("awq: alpha=%s loss %.4g (s=1: %.4g)", found.alpha, found.loss, found.identity_loss)
        return None if found.alpha is None else found.scales  # s = 1: folding would only add rounding


@register_stage
class AWQClip(Quantizer):
    """Clip search per quantization block, then round-to-nearest."""

    name = "awq_clip"
    needs = frozenset({"inputs"})
    objective = "output_mse"
    Config = AWQClipConfig

    def quantize_weight(self, weight, args, stats: LinearStats | None) -> LayerResult:
        return self._quantize(weight, args, stats, self.config.clip)

    def quantize_target(self, target: Target, stats: LinearStats | None) -> LayerResult:
        clip = self.config.clip and not self.config.skips_clip(target.name)
        return self._quantize(target.module.weight.data, target.args, stats, clip)

    def _quantize(self, weight, args: QuantArgs, stats: LinearStats | None, clip: bool) -> LayerResult:
        x = (stats if stats is not None else LinearStats()).require("inputs", "awq").inputs
        if clip:
            step = -(-x.shape[0] // self.config.max_clip_tokens)
            xmin, xmax = search_clip(
                weight, x[::step], args, self.config.clip_grid, self.config.min_clip_ratio
            )
            q = quantize(weight, args, xmin, xmax)
        else:
            q = observed_quantize(weight, args)
        return LayerResult(q, output_error(weight, q, x))
