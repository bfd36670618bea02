"""What the quantizer's grid covers: weights against their representable range, activations
against the range their scheme would pick.

For a quantized weight Q with codes c, every element w has a representable interval
[lo, hi]: the dequantized values of the format's two extreme codes with that element's scale
(and zero point or minimum), e.g. for int4 with zero point z and scale s: lo = (0 - z) s,
hi = (15 - z) s. From the float weight W:

    normalised weight   u = (w - lo) / (hi - lo)        0..1 is the grid, outside is clipped
    clipped fraction    #{u < -t or u > 1 + t} / numel, t = half the outermost grid step in u
                        (a weight within half a step of the grid's end rounds to it as any other)
    reach of a group    r = min over its extremes e in {max w, min w}, e != 0, of b(e) / e,
                        b(e) = hi when e > 0, else lo
                        r = 1: the grid ends at the group's extreme weight (min-max);
                        r < 1: the group's extreme weights are clipped (MSE-chosen or GPTQ grids)

Stages that transform weights before quantizing (AWQ, SmoothQuant: W' = W diag(s)) are undone
for the comparison by a least-squares scale per input column, s_j = <W_j, D_j> / <W_j, W_j>
with D the dequantized weight; when even that leaves the weights unlike (relative difference
above ``MATCH_TOLERANCE``), the float weight is not the one that was quantized and no clipping
is reported for it.

Activations are the inputs of the float model's linears on a few evaluation tokens (forward
pre-hooks, removed on exit). A static activation scheme's range is what its observer picks on
them; a dynamic per-token scheme's range is each token's own (the median is drawn).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.core.args import QuantArgs
from lowbit.core.packing import pack
from lowbit.core.tensor import QuantizedTensor, to_storage

MATCH_TOLERANCE = 0.5
"""Largest ||W - D|| / ||D|| for a float weight to count as the one quantized (4-bit RTN is
about 0.1; an unrelated weight of the same shape about 1.4)."""
MAX_SAMPLES = 200_000
"""Values kept per histogram (a fixed random subset of larger tensors)."""


@dataclass
class WeightClipping:
    """One linear of one run: its float weights seen from its quantization grid."""

    name: str
    normalised: np.ndarray
    """A sample of u = (w - lo) / (hi - lo)."""
    reach: np.ndarray
    """Per group r (see the module docstring)."""
    clipped_fraction: float
    rescaled: bool
    """Whether per-column scales were fitted first (a transform stage ran)."""


@dataclass
class ActivationRange:
    label: str
    low: float
    high: float


@dataclass
class ActivationClipping:
    """One linear's float inputs and the ranges its runs' activation schemes pick."""

    name: str
    values: np.ndarray
    """A sample of the input activations."""
    absmax: float
    ranges: list[ActivationRange]


def read_quantized(folder: str | Path, names: list[str]) -> dict[str, tuple[QuantizedTensor, QuantArgs | None]]:
    """The stored QuantizedTensor (and input-activation settings) of each named layer of a
    lowbit folder, read without building the model. Unknown names are left out."""
    from lowbit.io import read_quantization_config
    from lowbit.pipeline.lazy import Checkpoint

    qc = read_quantization_config(folder)
    checkpoint = Checkpoint(folder)
    out = {}
    for name in names:
        meta = qc["layers"].get(name)
        if meta is None:
            continue
        tensors = {k: checkpoint.get(f"{name}.{k}") for k in QuantizedTensor.STORED_FIELDS
                   if f"{name}.{k}" in checkpoint}
        acts = meta.get("input_activations")
        out[name] = (QuantizedTensor.from_tensors(tensors, meta), QuantArgs.from_dict(acts) if acts else None)
    return out


def representable_range(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise (lo, hi), float32, shape ``qt.shape``: the values of the format's two
    extreme codes under each element's own scale, zero point or minimum."""
    fmt = qt.format
    if fmt.kind == "int":
        extremes = [torch.full(qt.shape, c, dtype=fmt.code_dtype) for c in (fmt.qmin, fmt.qmax)]
    elif fmt.kind == "lookup":
        levels = fmt.levels_tensor()
        extremes = [torch.full(qt.shape, int(i), dtype=torch.uint8) for i in (levels.argmin(), levels.argmax())]
    else:
        extremes = [torch.full(qt.shape, v, dtype=torch.float32).to(fmt.float_dtype)
                    for v in (-fmt.max_value, fmt.max_value)]
    a, b = (dataclasses.replace(qt, qdata=pack(to_storage(c, fmt), fmt.bits)).dequantize(torch.float32)
            for c in extremes)
    return torch.minimum(a, b), torch.maximum(a, b)


def edge_tolerance(fmt) -> float:
    """Half the outermost step of the grid, as a fraction of the grid's span."""
    if fmt.kind == "int":
        return 0.5 / (fmt.qmax - fmt.qmin)
    if fmt.kind == "lookup":
        levels = sorted(fmt.levels)
        span = levels[-1] - levels[0]
        return 0.5 * min(levels[1] - levels[0], levels[-1] - levels[-2]) / span
    top = torch.tensor([fmt.max_value]).to(fmt.float_dtype)
    below = float((top.view(torch.uint8) - 1).view(fmt.float_dtype).float())
    return 0.5 * (fmt.max_value - below) / (2 * fmt.max_value)


def group_ids(qt: QuantizedTensor) -> torch.Tensor:
    """Element-wise index of the block (group) each element's scale belongs to."""
    grid = qt.scale.shape
    ids = torch.arange(qt.scale.numel(), dtype=torch.float64).reshape(grid)
    return qt.expand(ids).long()


def weight_clipping(name: str, weight: torch.Tensor, qt: QuantizedTensor, *, rescale: bool = False,
                    max_samples: int = MAX_SAMPLES) -> WeightClipping | None:
    """``weight`` (the float weight) against the grid of ``qt``; None when they do not match.

    rescale: first fit one scale per input column (the weight was transformed before
    quantizing, see the module docstring)."""
    w = weight.detach().float().cpu()
    if tuple(w.shape) != tuple(qt.shape):
        return None
    d = qt.dequantize(torch.float32)
    if rescale:
        s = (w * d).sum(0) / (w * w).sum(0).clamp_min(1e-30)
        w = w * s
    if (w - d).norm() > MATCH_TOLERANCE * d.norm().clamp_min(1e-30):
        return None
    lo, hi = representable_range(qt)
    u = (w - lo) / (hi - lo).clamp_min(1e-30)
    t = edge_tolerance(qt.format)
    clipped = float(((u < -t) | (u > 1 + t)).float().mean())
    return WeightClipping(name, _sample(u, max_samples), _reach(w, lo, hi, group_ids(qt)), clipped, rescale)


def _reach(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    n = int(ids.max()) + 1
    flat = ids.reshape(-1)

    def per_group(x, reduce):
        start = torch.full((n,), float("-inf") if reduce == "amax" else float("inf"))
        return start.scatter_reduce(0, flat, x.reshape(-1), reduce=reduce)

    wmax, wmin = per_group(w, "amax"), per_group(w, "amin")
    gmax, gmin = per_group(hi, "amax"), per_group(lo, "amin")
    inf = torch.tensor(float("inf"))
    upper = torch.where(wmax > 0, gmax / wmax.clamp_min(1e-30), inf)
    lower = torch.where(wmin < 0, gmin / wmin.clamp_max(-1e-30), inf)
    reach = torch.minimum(upper, lower).clamp_min(0)
    return reach[torch.isfinite(reach)].numpy()


@contextmanager
def captured_inputs(model: nn.Module, names: list[str], max_rows: int):
    """Within the block, forwards of ``model`` record the inputs of the named linears (at most
    ``max_rows`` rows of each, flattened over batch and positions); yields name -> list of
    tensors. The hooks are removed on exit."""
    found: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())

    def hook(name):
        def record(module, args):
            kept = sum(t.shape[0] for t in found[name])
            if kept < max_rows:
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                found[name].append(x[: max_rows - kept].float().cpu())
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names if n in modules]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def activation_inputs(model: nn.Module, ids: torch.Tensor, names: list[str], max_rows: int = 4096
                      ) -> dict[str, torch.Tensor]:
    """Inputs ``(rows, in_features)`` of the named linears when ``model`` reads ``ids`` (1, T)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with captured_inputs(model, names, max_rows) as found, torch.no_grad():
        model(input_ids=ids.to(device), use_cache=False)
    return {n: torch.cat(t) for n, t in found.items() if t}


def activation_clipping(name: str, x: torch.Tensor, schemes: list[tuple[str, QuantArgs | None]],
                        max_samples: int = MAX_SAMPLES) -> ActivationClipping:
    """The captured inputs ``x`` of one linear and, for each (run label, input-activation
    settings) that quantizes activations, the range it picks on them."""
    from lowbit.observers import observed_range

    x = x.float()
    ranges = []
    for label, args in schemes:
        if args is None:
            continue
        if args.dynamic and args.granularity == "token":
            if args.symmetric:
                a = x.abs().amax(-1)
                low, high = -float(a.median()), float(a.median())
            else:
                low, high = float(x.amin(-1).median()), float(x.amax(-1).median())
            ranges.append(ActivationRange(f"{label}: {args.describe()} (median token)", low, high))
            continue
        xmin, xmax = (x.amin(), x.amax()) if args.dynamic else observed_range(x, args)
        low, high = float(xmin.min()), float(xmax.max())
        if args.symmetric:
            low, high = -max(abs(low), abs(high)), max(abs(low), abs(high))
        ranges.append(ActivationRange(f"{label}: {args.describe()}", low, high))
    return ActivationClipping(name, _sample(x, max_samples), float(x.abs().max()), ranges)


def code_usage(qt: QuantizedTensor) -> np.ndarray:
    """How many weights use each code of the format (index = storage code, 0 .. 2^bits - 1)."""
    from lowbit.core.packing import unpack

    stored = unpack(qt.qdata, qt.format.bits, qt.shape[-1]).reshape(-1).long()
    return torch.bincount(stored, minlength=1 << qt.format.bits).numpy()


def _sample(t: torch.Tensor, n: int) -> np.ndarray:
    flat = t.reshape(-1)
    if flat.numel() > n:
        generator = torch.Generator().manual_seed(0)
        flat = flat[torch.randperm(flat.numel(), generator=generator)[:n]]
    return flat.numpy().copy()
