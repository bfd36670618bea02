"""GPTQ: quantize a weight one column at a time, spreading each column's rounding error over the
columns not yet quantized (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", Algorithm 1).

Objective, per linear with calibration inputs X (rows x): minimise ||W X^T - Q X^T||^2 row by
row; its Hessian is H = 2/n sum x x^T (``HessianStats.hessian``). After quantizing column q, the
optimal update of the columns F not yet quantized (q included) is (the paper's eq. 2, OBS)

    delta_F = -(w_q - quant(w_q)) / [H_F^-1]_qq * (H_F^-1)_{q,:}

and (H_F^-1)_{q,:} / sqrt([H_F^-1]_qq) is row q of U, the upper Cholesky factor of H^-1
(the paper's step 3), so delta_F = -(w_q - quant(w_q)) / U[q, q] * U[q, q:].

Symbols in ``gptq``: W = weight (N x K, float32, held transposed as ``Wt`` so that a column is
a contiguous row), H = Hessian (dampened: H + lambda I, lambda = dampening * mean(diag(H))),
U = upper Cholesky factor of H^-1 (``Hinv`` in the reference code), Err1[i] = (w - q) / U[j, j]
for the block's columns, B = ``block_size`` (lazy batch updates: a column receives its own
block's earlier updates when it is reached, the columns after the block get them once per
block, W[:, i2:] -= Err1 @ U[i1:i2, i2:]).

The reported loss is the relative output error tr((W-Q) H (W-Q)^T) / tr(W H W^T) with the
undamped H, i.e. ||(W - Q) X^T||^2 / ||W X^T||^2 on the calibration inputs: comparable across
methods and layers (the paper's sum (w - q)^2 / U[q, q]^2 is not).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lowbit.core.args import QuantArgs
from lowbit.core.blocks import grid_shape, to_blocks
from lowbit.core.qparams import qparams_from_range
from lowbit.core.superblock import two_level_qparams
from lowbit.core.tensor import QuantizedTensor
from lowbit.core.values import dequantize_values, quantize_values
from lowbit.errors import ConfigError, LowbitError
from lowbit.methods.base import LayerResult, LinearStats, Quantizer, register_stage, relative_output_error
from lowbit.observers import observed_range
from lowbit.observers.mse import search_ratio

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig:
    block_size: int = 128
    """Columns per lazy batch update; changes speed, not the result (up to float rounding)."""
    dampening: float = 0.01
    """lambda added to diag(H), as a fraction of mean(diag(H)) (the paper's 1%)."""
    act_order: bool = True
    """Quantize columns in decreasing order of diag(H) (the reference's ``--act-order``)."""
    static_groups: bool = True
    """Scales from the original weights up front, groups contiguous in the original column
    order. False: each group's scale from the error-updated weights when its first column is
    reached (reference default); with act_order the groups then follow the permuted order and
    the result carries a ``group_index``."""
    scale_search: bool = False
    """Static groups: choose each group's range by a search over clipping ratios (1.0 down to
    ``search_min_ratio``) that minimises the group's squared weight error weighted by diag(H),
    the mean square of each input (llama.cpp's importance matrix objective), before the column
    sweep; otherwise the observer's range."""
    search_min_ratio: float = 0.5
    search_steps: int = 51
    retries: int = 3
    """If the Cholesky factorisation fails, multiply the dampening by ``retry_factor`` and try
    again, at most this many times."""
    retry_factor: float = 10.0

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"gptq block_size must be an integer >= 1, got {self.block_size}")
        if not self.dampening >= 0:
            raise ConfigError(f"gptq dampening must be >= 0, got {self.dampening}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"gptq retries must be an integer >= 0, got {self.retries}")
        if not self.retry_factor > 1:
            raise ConfigError(f"gptq retry_factor must be > 1, got {self.retry_factor}")
        if not isinstance(self.scale_search, bool) or (self.scale_search and not self.static_groups):
            raise ConfigError("gptq scale_search must be true or false, and needs static_groups=true")
        if not 0 < self.search_min_ratio <= 1 or not isinstance(self.search_steps, int) or self.search_steps < 1:
            raise ConfigError("gptq search_min_ratio must be in (0, 1] and search_steps an integer >= 1")


@dataclass
class GPTQOutput:
    qweight: QuantizedTensor
    dequantized: torch.Tensor  # float32 Q as the algorithm computed it (= qweight.dequantize())
    loss: float  # relative output error on the calibration inputs (module docstring)
    dampening: float  # the dampening fraction that succeeded (after any retries)


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, config: GPTQConfig) -> GPTQOutput:
    """Quantize ``weight`` (N x K) with the Hessian of its inputs (K x K), Algorithm 1."""
    N, K = weight.shape
    device = weight.device
    if tuple(hessian.shape) != (K, K):
        raise LowbitError(
            f"gptq: Hessian shape {tuple(hessian.shape)} does not match weight inputs {K}; "
            "accumulate it from this layer's inputs"
        )
    H0 = hessian.to(device, torch.float32)
    if not torch.isfinite(H0).all():
        raise LowbitError("gptq: the Hessian has NaN or inf entries; check the calibration inputs")
    W = weight.detach().to(torch.float32).clone()
    H = H0.clone()

    # Inputs that were always zero carry no information: fix their weights at 0.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    fmt = args.code_format
    block = args.block_size((N, K))
    rows, g = block[0], min(block[1], K)  # g: columns sharing one scale (a group)
    scale = torch.empty(grid_shape((N, K), block), dtype=args.torch_scale_dtype, device=device)
    zero = None if args.symmetric else torch.empty(scale.shape, dtype=fmt.code_dtype, device=device)
    # Each group's scale / zero point as float32, one value per weight row (row c = group c),
    # read once per column in the loop.
    row_scale = torch.empty(scale.shape[1], N, device=device)
    row_zero = None if zero is None else torch.empty_like(row_scale)
    def group_range(x: torch.Tensor, group_args: QuantArgs):
        if config.scale_search:
            return weighted_search_range(x, torch.diag(H0).clamp_min(0), group_args, config)
        return observed_range(x, group_args)

    two = None  # two-level scales (k-quants): the group minimum replaces the zero point
    if args.super_block is not None:
        if not config.static_groups:
            raise ConfigError("gptq with two-level (k-quant) scales needs static_groups=true")
        two = two_level_qparams(*group_range(W, args), args)
        row_scale = two.scale().repeat_interleave(rows, 0)[:N].t().contiguous()
        m = two.minimum()
        row_zero = None if m is None else m.repeat_interleave(rows, 0)[:N].t().contiguous()

    def set_params(first: int, x: torch.Tensor, group_args: QuantArgs) -> None:
        """Quantization parameters of the groups ``first, first + 1, ...`` covering ``x``."""
        s, z = qparams_from_range(*group_range(x, group_args), group_args)
        cols = slice(first, first + s.shape[1])
        scale[:, cols] = s
        row_scale[cols] = s.float().repeat_interleave(rows, 0)[:N].t()
        if zero is not None:
            zero[:, cols] = z
            row_zero[cols] = z.float().repeat_interleave(rows, 0)[:N].t()

    if config.static_groups and two is None:
        set_params(0, W, args)  # every group up front, from the original weights

    perm = torch.arange(K, device=device)
    if config.act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    # the group of the j-th quantized column: contiguous in the original order (static) or in
    # the quantization order (dynamic)
    column_group = (perm // g if config.static_groups else torch.arange(K) // g).tolist()

    U, damp = _inverse_cholesky(H, config)
    del H

    # W is held transposed (K x N) so that column j is the contiguous row Wt[j].
    Wt = W.t().contiguous()
    del W
    Qt = torch.empty_like(Wt)
    codes = torch.empty(K, N, dtype=fmt.code_dtype, device=device)
    B = config.block_size
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = Wt[i1:i2]
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.empty(i2 - i1, N, device=device)  # row i is written before it is read
        for i in range(i2 - i1):
            j = i1 + i
            if not config.static_groups and j % g == 0:
                # the group's columns as they are now: with this block's updates so far
                end = min(j + g, K)
                x = Wt[j:end] - U[i1:j, j:end].t() @ Err1[:i]
                set_params(j // g, x.t(), _group_args(args, end - j))
            # Column j receives the updates from this block's earlier columns now, as one
            # vector-matrix product, rather than as a rank-1 update of the block after each
            # column: the same sums, far less memory traffic.
            w = W1[i] - U1[:i, i] @ Err1[:i]
            c = column_group[j]
            z = None if row_zero is None else row_zero[c]
            if two is None:
                codes[j] = code = quantize_values(w, row_scale[c], z, fmt)
                Qt[j] = q = dequantize_values(code, row_scale[c], z, fmt)
            else:
                codes[j] = code = quantize_values(w, row_scale[c], None, fmt, minimum=z)
                Qt[j] = q = dequantize_values(code, row_scale[c], None, fmt, minimum=z)
            Err1[i] = (w - q) / U1[i, i]
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)

    inverse = torch.argsort(perm)
    Q = Qt.t()[:, inverse]
    codes = codes.t()[:, inverse]
    group_index = None
    if not config.static_groups and config.act_order:
        group_index = (inverse // g).to(torch.int32)  # column k was quantized at position inverse[k]
        if torch.equal(group_index, torch.arange(K, device=device) // g):
            group_index = None
    if two is not None:
        qweight = QuantizedTensor.from_codes(codes, None, None, fmt, block, weight.dtype, two_level=two)
    else:
        qweight = QuantizedTensor.from_codes(
            codes, scale, zero, fmt, block, weight.dtype, group_index=group_index
        )
    return GPTQOutput(qweight, Q, relative_output_error(weight, Q, H0), damp)


def _inverse_cholesky(H: torch.Tensor, config: GPTQConfig) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + lambda I)^-1, lambda = dampening * mean(diag(H)); on
    failure (H not positive definite) retry with the dampening times ``retry_factor``.

    With J the reversal permutation and J H J = L L^T, H^-1 = U^T U for the upper triangular
    U = J L^-1 J: one Cholesky factorisation and one triangular solve, no explicit H^-1 (the
    reference code's cholesky -> cholesky_inverse -> cholesky gives the same U, but LAPACK's
    threaded inverse is very slow on a busy CPU).
    """
    mean_diag = float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], device=H.device)
    damp = config.dampening
    for attempt in range(config.retries + 1):
        L, info = torch.linalg.cholesky_ex((H + (damp * mean_diag) * eye).flip(0, 1))
        if int(info) == 0:
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            if torch.isfinite(U).all():
                return U, damp
        if attempt < config.retries:
            log.warning(
                "gptq: Hessian is not positive definite with dampening %g; retrying with %g",
                damp, damp * config.retry_factor,
            )
            damp *= config.retry_factor
    raise LowbitError(
        f"gptq: Hessian is not positive definite even with dampening {damp:g}; "
        "use more calibration samples or raise gptq's dampening/retries"
    )


def weighted_search_range(W: torch.Tensor, importance: torch.Tensor, args: QuantArgs, config: GPTQConfig):
    """Per-group range ``(xmin, xmax)`` of ``W`` (N x K): the clipping ratio of least
    sum_k importance[k] * (w_k - q(w_k))^2 within each group (``observers.mse.search_ratio``)."""
    block = args.block_size(W.shape)
    blocks = to_blocks(W.float(), block)
    weights = to_blocks(importance.float().expand_as(W), block)
    grid = blocks.shape[:-1]
    xmin, xmax = blocks.amin(-1).flatten(), blocks.amax(-1).flatten()
    ratios = torch.linspace(1.0, config.search_min_ratio, config.search_steps, device=W.device)
    search_args = args.with_(super_block=None, scale_format=None)  # the group's own grid
    r = search_ratio(blocks.reshape(-1, blocks.shape[-1]), weights.reshape(-1, blocks.shape[-1]),
                     xmin, xmax, ratios, search_args)
    return (r * xmin).view(grid), (r * xmax).view(grid)


def _group_args(args: QuantArgs, width: int) -> QuantArgs:
    """``args`` for one group of ``width`` columns taken out of the weight (ragged last group)."""
    if args.granularity == "group":
        return args.with_(group_size=width)
    if args.granularity == "block":
        return args.with_(block_shape=(args.block_shape[0], width))
    return args  # tensor / channel / token: the group is every column


@register_stage
class GPTQ(Quantizer):
    name = "gptq"
    needs = frozenset({"hessian"})
    objective = "relative_output_error"
    Config = GPTQConfig

    def quantize_weight(self, weight, args, stats: LinearStats | None) -> LayerResult:
        if stats is None:
            stats = LinearStats()
        out = gptq(weight, stats.require("hessian", "gptq").hessian, args, self.config)
        return LayerResult(out.qweight, out.loss)
