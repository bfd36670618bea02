"""HQQ: Half-Quadratic Quantization (Badri & Shaji, Mobius Labs, 2023), data-free.

For every block (group) of weights W, with codes W_q = clamp(round(W / s + z)) and the
reconstruction W_r = (W_q - z) * s, HQQ minimises the sparsity-promoting error

    phi(z) = || W - W_r(z) ||_p^p        (p < 1, default 0.7)

by half-quadratic splitting: an auxiliary W_e stands for the error W - W_r, and the problem
becomes  min_{z, W_e} ||W_e||_p^p + beta/2 ||W_e - (W - W_r(z))||_2^2,  solved by alternating

    (1) W_e = shrink_p(W - W_r, beta)        generalised soft-thresholding (lp shrinkage)
    (2) z   = mean(W_q - (W - W_e) / s)      closed form, over the block
    beta <- kappa * beta

``optimize_scale=True`` replaces (2) by the least-squares fit of both s and z to W - W_e for the
fixed codes (an affine fit, also closed form). Symmetric, lookup and float8 formats (no zero
point) fit the scale alone: s = <C, W - W_e> / <C, C>, with C the unit-scale value of each code.

With the published beta = 10 the shrinkage is nonzero only for residuals above
beta^(-1/(2-p)) ~ 0.17 (weight units), so on LLM-scale weights W_e = 0 and step (2) is the
least-squares zero point for the current codes.

Symbols -> code: W ``w`` (blocks, float32), s ``scale``, z ``zero``, W_q ``codes``,
C ``levels``, W_r ``recon``, W_e ``w_e``, p ``lp_norm``, beta ``beta``, kappa ``kappa``.

Differences from the hqq library are listed in docs/methods/hqq.md: blocks follow lowbit's
granularity (groups within rows, a ragged last group), scale and zero point are rounded to
their storage dtype before each evaluation, and each block keeps its best iterate by the L2
weight error, starting from RTN min-max, so the result is never worse than RTN per block.

loss: mean squared weight error ||W - dequantize(Q(W))||^2 / numel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.args import QuantArgs
from lowbit.core.blocks import expand_blocks, to_blocks
from lowbit.core.qparams import qparams_from_range
from lowbit.core.tensor import QuantizedTensor
from lowbit.core.values import dequantize_values, quantize_values
from lowbit.errors import ConfigError
from lowbit.methods.base import LayerResult, Quantizer, register_stage
from lowbit.methods.rtn import weight_mse


@dataclass(frozen=True)
class HQQConfig:
    """Defaults are the hqq library's (mobiusml/hqq, hqq/core/optimize.py, ``opt_params`` of
    ``optimize_weights_proximal``): lp_norm 0.7, beta 10, kappa 1.01, 20 iterations, early stop."""

    lp_norm: float = 0.7
    """p of the lp error; 0 < p <= 1 (1 gives ordinary soft-thresholding)."""
    beta: float = 10.0
    """Initial half-quadratic penalty; acts in weight units (see docs/methods/hqq.md)."""
    kappa: float = 1.01
    """beta grows by this factor every iteration."""
    iters: int = 20
    optimize_scale: bool = False
    """Also refit the scale (least squares) for asymmetric formats; symmetric, lookup and
    float8 formats always fit the scale, having no zero point."""
    early_stop: bool = True
    """Stop updating a block once its L2 error stops decreasing; the loop ends when no block
    is still improving."""

    def __post_init__(self):
        if not 0.0 < self.lp_norm <= 1.0:
            raise ConfigError(f"hqq lp_norm must be in (0, 1], got {self.lp_norm}")
        if not self.beta > 0.0:
            raise ConfigError(f"hqq beta must be > 0, got {self.beta}")
        if not self.kappa >= 1.0:
            raise ConfigError(f"hqq kappa must be >= 1, got {self.kappa}")
        if not (isinstance(self.iters, int) and self.iters >= 0):
            raise ConfigError(f"hqq iters must be an integer >= 0, got {self.iters}")


@dataclass
class HQQFit:
    """Fitted parameters of every block, already in their storage dtype."""

    scale: torch.Tensor
    zero_point: torch.Tensor | None
    error: torch.Tensor
    """Per block: sum of squared weight errors of the stored parameters (float32)."""
    steps: int
    """Half-quadratic iterations run (fewer than ``iters`` after an early stop)."""


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: sign(x) * max(|x| - |x|^(p-1) / beta, 0).

    The lp shrinkage of the HQQ paper (for p = 1, soft-thresholding by 1/beta). At x = 0 the
    threshold is infinite and the result 0. The result is nonzero only where
    |x| > beta^(-1 / (2 - p)), so the costly power is taken there alone (with a margin, so the
    values are those of the formula everywhere)."""
    a = x.abs()
    keep = a > 0.999 * beta ** (-1.0 / (2.0 - p))
    out = torch.zeros_like(x)
    if bool(keep.any()):
        ak = a[keep]
        out[keep] = torch.sign(x[keep]) * torch.relu(ak - ak.pow(p - 1.0) / beta)
    return out


def valid_mask(shape, block_size, device=None) -> torch.Tensor:
    """``to_blocks`` layout of a mask that is False on the padding of ragged last blocks."""
    grid = [-(-s // b) * b for s, b in zip(shape, block_size)]
    mask = torch.ones(grid, dtype=torch.bool, device=device)
    for dim, s in enumerate(shape):
        mask.narrow(dim, s, grid[dim] - s).fill_(False)
    return to_blocks(mask, block_size)


def fit_blocks(w: torch.Tensor, valid: torch.Tensor, args: QuantArgs, config: HQQConfig) -> HQQFit:
    """HQQ fit of every block of ``w`` (``(..., elements)``, float32) at once.

    ``valid`` marks real elements (False on ragged padding): padding takes no part in the
    means and errors. Candidates are RTN min-max and every HQQ iterate; each block keeps the
    one with the lowest L2 error, evaluated with scale and zero point in storage dtype."""
    fmt = args.code_format
    asymmetric = not args.symmetric
    store = args.torch_scale_dtype
    m = valid.to(w.dtype)
    count = m.sum(-1, keepdim=True)
    lo, hi = w.amin(-1), w.amax(-1)

    def evaluate(scale, zero):
        s = scale.to(store).float()
        z = zero.to(store).float() if asymmetric else None
        codes = quantize_values(w, s, z, fmt)
        recon = dequantize_values(codes, s, z, fmt)
        error = ((w - recon).square() * m).sum(-1, keepdim=True)
        return codes, recon, error

    # Start candidates: RTN min-max exactly as lowbit's rtn method stores it; for asymmetric
    # formats also the hqq library's start, the plain min-max range (not widened to contain 0)
    # with a float zero point, which measured slightly better as a starting point.
    starts = [qparams_from_range(lo, hi, args)]
    if asymmetric:
        scale = ((hi - lo) / (fmt.qmax - fmt.qmin)).clamp_min(torch.finfo(store).tiny)
        starts.append((scale, -lo / scale.to(store).float()))
    best = None
    for scale, zero in starts:
        scale = scale.float().unsqueeze(-1)
        zero = zero.float().unsqueeze(-1) if asymmetric else None
        codes, recon, error = evaluate(scale, zero)
        best = _keep_better(best, scale, zero, error)

    last_error = error
    active = torch.ones_like(error, dtype=torch.bool)
    beta = config.beta
    steps = 0
    for _ in range(config.iters):
        w_e = shrink_lp(w - recon, beta, config.lp_norm)
        target = w - w_e  # what (W_q - z) * s should reproduce
        levels = dequantize_values(codes, torch.ones_like(scale), None, fmt)
        new_scale, new_zero = _closed_form(levels, target, m, count, scale, asymmetric, config)
        scale = torch.where(active, new_scale, scale)
        zero = torch.where(active, new_zero, zero) if asymmetric else None
        beta *= config.kappa
        steps += 1

        codes, recon, error = evaluate(scale, zero)
        best = _keep_better(best, scale, zero, error)
        if config.early_stop:
            active &= error < last_error
            if not bool(active.any()):
                break
        last_error = error

    best_scale, best_zero, best_error = best
    return HQQFit(
        best_scale.squeeze(-1).to(store),
        best_zero.squeeze(-1).to(store) if asymmetric else None,
        best_error.squeeze(-1),
        steps,
    )


def _keep_better(best, scale, zero, error):
    """Per block, the (scale, zero, error) with the lower error; ties keep the earlier one."""
    if best is None:
        return scale, zero, error
    better = error < best[2]
    pick = lambda new, old: None if old is None else torch.where(better, new, old)  # noqa: E731
    return pick(scale, best[0]), pick(zero, best[1]), torch.where(better, error, best[2])


def _closed_form(levels, target, m, count, scale, asymmetric, config):
    """Step (2): zero point (and scale) that best reproduce ``target`` for fixed codes."""
    if not asymmetric:
        # target ~ levels * s: least squares through the origin
        num = (m * levels * target).sum(-1, keepdim=True)
        den = (m * levels.square()).sum(-1, keepdim=True)
        new = num / den.clamp_min(torch.finfo(den.dtype).tiny)
        return torch.where((den > 0) & (new > 0), new, scale), None
    mean_c = (m * levels).sum(-1, keepdim=True) / count
    mean_t = (m * target).sum(-1, keepdim=True) / count
    if config.optimize_scale:
        # target ~ (levels - z) * s: an affine fit with slope s
        dc = m * (levels - mean_c)
        cov = (dc * (target - mean_t)).sum(-1, keepdim=True)
        var = (dc * (levels - mean_c)).sum(-1, keepdim=True)
        slope = cov / var.clamp_min(torch.finfo(var.dtype).tiny)
        scale = torch.where((var > 0) & (slope > 0), slope, scale)
    # mean over the block of W_q - (W - W_e) / s
    return scale, mean_c - mean_t / scale


def hqq_quantize(
    weight: torch.Tensor, args: QuantArgs, config: HQQConfig
) -> tuple[QuantizedTensor, HQQFit]:
    """Quantize ``weight`` with HQQ-fitted scales (and float zero points when asymmetric)."""
    block = args.block_size(weight.shape)
    w = to_blocks(weight.detach().float(), block)
    fit = fit_blocks(w, valid_mask(weight.shape, block, weight.device), args, config)
    zp = None if fit.zero_point is None else expand_blocks(fit.zero_point, block, weight.shape)
    codes = quantize_values(
        weight, expand_blocks(fit.scale, block, weight.shape), zp, args.code_format
    )
    q = QuantizedTensor.from_codes(
        codes, fit.scale, fit.zero_point, args.code_format, block, weight.dtype
    )
    return q, fit


@register_stage
class HQQ(Quantizer):
    name = "hqq"
    objective = "weight_mse"
    Config = HQQConfig

    def quantize_weight(self, weight, args, stats=None) -> LayerResult:
        if args.super_block is not None:
            raise ConfigError(f"hqq cannot fit two-level (k-quant) scales ({args.name()}); use rtn, gptq or awq")
        q, _ = hqq_quantize(weight, args, self.config)
        return LayerResult(q, weight_mse(weight, q))
