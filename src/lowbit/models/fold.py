"""Fold per-channel scales through a ``ScaleMapping`` without changing what a layer computes.

For a mapping ``smooth -> balance`` and positive scales ``s`` (one per channel that flows from
``smooth`` into every ``balance`` linear), the layer computes the same function after

- ``smooth`` output divided by ``s``:
  a norm ``y = x_hat * (offset + w) (+ b)``: ``w -> (offset + w) / s - offset``, ``b -> b / s``;
  a linear ``y = x W^T + b``: output rows ``W[j, :] -> W[j, :] / s_j``, ``b -> b / s``;
- each ``balance`` linear's input columns multiplied by ``s``: ``W[:, j] -> W[:, j] * s_j``,

because ``(W * s)(x / s) = W x``. This is the equivalent transform of AWQ (Lin et al. 2023,
"AWQ: Activation-aware Weight Quantization", eq. 4) and SmoothQuant (Xiao et al. 2022, eq. 3).
The identity holds only when nothing between ``smooth`` and ``balance`` mixes channels
non-linearly: true for the norm -> linear and v_proj -> o_proj (attention weights mix tokens,
not channels) and up_proj -> down_proj (the gate multiplies element-wise) mappings in ``arch``.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import UnsupportedArchitectureError
from lowbit.models.arch import Architecture, ScaleMapping


def _module(layer: nn.Module, name: str) -> nn.Module:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        raise UnsupportedArchitectureError(
            f"module {name!r} named by a scale mapping is not in the decoder layer "
            f"({type(layer).__name__}); fix the mapping in lowbit/models/arch.py"
        ) from None


def _weight(module: nn.Module, name: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise UnsupportedArchitectureError(
            f"module {name!r} ({type(module).__name__}) has no weight to fold scales into; "
            "fix the mapping in lowbit/models/arch.py"
        )
    return weight


def skip_reason(layer: nn.Module, mapping: ScaleMapping) -> str | None:
    """Why ``mapping`` cannot be folded in ``layer`` (shapes do not fit), or None if it can.

    The usual case is ``v_proj -> o_proj`` under grouped-query attention: v_proj produces
    ``kv_heads * head_dim`` channels but o_proj reads ``heads * head_dim``, so one scale per
    o_proj input has no single v_proj row to divide.
    """
    smooth = _weight(_module(layer, mapping.smooth), mapping.smooth)
    if smooth.dim() not in (1, 2):
        return f"{mapping.smooth} weight has {smooth.dim()} dimensions (expected a norm or linear)"
    width = smooth.shape[0]
    for name in mapping.balance:
        weight = _weight(_module(layer, name), name)
        if weight.dim() != 2:
            return f"{name} is not a linear (weight has {weight.dim()} dimensions)"
        if weight.shape[1] != width:
            return (
                f"{mapping.smooth} produces {width} channels but {name} reads {weight.shape[1]}"
            )
    return None


def mapping_applies(layer: nn.Module, mapping: ScaleMapping) -> bool:
    """True when scales can be folded through ``mapping`` in ``layer`` (see ``skip_reason``)."""
    return skip_reason(layer, mapping) is None


@torch.no_grad()
def fold_scales(
    layer: nn.Module, mapping: ScaleMapping, scales: torch.Tensor, arch: Architecture
) -> None:
    """Divide ``mapping.smooth``'s output by ``scales`` and multiply every balance linear's
    input columns by them, in place. ``scales``: positive, one per smooth output channel.

    Arithmetic is done in float32 (at least) and cast back to each weight's dtype.
    """
    reason = skip_reason(layer, mapping)
    if reason is not None:
        raise ValueError(f"cannot fold scales through {mapping}: {reason}")
    smooth = _module(layer, mapping.smooth)
    weight = smooth.weight
    if scales.shape != (weight.shape[0],):
        raise ValueError(f"scales must have shape ({weight.shape[0]},), got {tuple(scales.shape)}")
    if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
        raise ValueError("scales must be finite and positive")

    def compute(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.promote_types(t.dtype, torch.float32))

    s = compute(scales.to(weight.device))
    if weight.dim() == 1:  # a norm: x_hat * (offset + w)
        offset = arch.norm_offset
        weight.copy_((offset + compute(weight)) / s - offset)
    else:  # a linear: output rows
        weight.copy_(compute(weight) / s[:, None])
    bias = getattr(smooth, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_(compute(bias) / s.to(bias.device))

    for name in mapping.balance:
        w = _module(layer, name).weight
        w.copy_(compute(w) * s.to(w.device)[None, :])
