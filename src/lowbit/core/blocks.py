"""Views of a tensor as blocks that share one scale, for any block-size tuple.

A dimension that the block does not divide gets a ragged last block. ``to_blocks`` fills the
missing places by repeating the last real element of that dimension, which leaves each block's
min, max and absmax unchanged.
"""

from __future__ import annotations

import math

import torch


def grid_shape(shape, block_size) -> tuple[int, ...]:
    """Number of blocks along each dimension (ragged last blocks included)."""
    return tuple(-(-s // b) for s, b in zip(shape, block_size))


def to_blocks(x: torch.Tensor, block_size) -> torch.Tensor:
    """``x`` as ``(*grid, elements_per_block)``."""
    shape = tuple(x.shape)
    grid = grid_shape(shape, block_size)
    for dim, (s, b, g) in enumerate(zip(shape, block_size, grid)):
        if g * b != s:
            idx = torch.arange(g * b, device=x.device).clamp_(max=s - 1)
            x = x.index_select(dim, idx)
    n = len(shape)
    split = []
    for g, b in zip(grid, block_size):
        split += [g, b]
    x = x.reshape(split)
    x = x.permute(*range(0, 2 * n, 2), *range(1, 2 * n, 2))
    return x.reshape(*grid, math.prod(block_size))


def expand_blocks(t: torch.Tensor, block_size, shape) -> torch.Tensor:
    """Repeat each per-block value over its block and cut to ``shape``."""
    for dim, b in enumerate(block_size):
        if b > 1:
            t = t.repeat_interleave(b, dim=dim)
    if tuple(t.shape) != tuple(shape):
        t = t[tuple(slice(0, s) for s in shape)]
    return t
