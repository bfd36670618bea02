"""Observers: streaming estimators of each block's quantization range, registered by name.

An observer folds batches (``update``) and returns one ``(xmin, xmax)`` per block, shaped as the
block grid of ``args.block_size(x.shape)``, ready for ``lowbit.core.quantize.quantize(x, args,
xmin, xmax)``. Its state has a fixed size: it does not grow with the number of batches.

The block grid must stay the same across updates: use per-tensor granularity for activation
streams whose batch size varies, and one update of the weight for per-channel or per-group
ranges. Every observer tracks the running min and max of each block; min-max returns them and
the others never return a range outside them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.core.args import QuantArgs
from lowbit.core.blocks import grid_shape, to_blocks
from lowbit.core.qparams import qparams_from_range
from lowbit.core.registry import Registry
from lowbit.errors import ConfigError


@dataclass
class Batch:
    """One update seen as blocks.

    values: ``(blocks, elements)`` float32, the block grid flattened
    mask:   same shape, True for real elements, False where ``to_blocks`` repeated an element to
            fill a ragged last block; None when every block is full
    min, max: ``(blocks,)``, each block's extremes in this batch
    """

    values: torch.Tensor
    mask: torch.Tensor | None
    min: torch.Tensor
    max: torch.Tensor


def real_elements(shape, block_size, device=None) -> torch.Tensor | None:
    """``(*grid, elements)`` bool, False where a ragged block was filled; None if none is."""
    shape = tuple(shape)
    grid = grid_shape(shape, block_size)
    padded = tuple(g * b for g, b in zip(grid, block_size))
    if padded == shape:
        return None
    mask = torch.ones(padded, dtype=torch.bool, device=device)
    for dim, (size, full) in enumerate(zip(shape, padded)):
        if size != full:
            keep = torch.arange(full, device=device) < size
            mask &= keep.view([-1 if d == dim else 1 for d in range(len(shape))])
    return to_blocks(mask, block_size)


class Observer:
    """Base class. Subclasses set ``name``, declare their options (with defaults) as keyword
    arguments of ``__init__``, and implement ``_fold`` and ``_range``."""

    name: ClassVar[str]

    def __init__(self, args: QuantArgs):
        self.args = args
        self.grid: tuple[int, ...] | None = None
        self.batches = 0
        self.xmin: torch.Tensor | None = None  # running per-block min, (blocks,)
        self.xmax: torch.Tensor | None = None

    @classmethod
    def options(cls) -> dict[str, object]:
        """The observer's options and their defaults, as declared by ``__init__``."""
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # skip self, args
        return {p.name: p.default for p in params}

    def update(self, x: torch.Tensor) -> None:
        """Fold one batch."""
        if x.numel() == 0:
            return
        block = self.args.block_size(x.shape)
        grid = grid_shape(x.shape, block)
        if self.grid is None:
            self.grid = grid
        elif grid != self.grid:
            raise ConfigError(
                f"{self.name} observer: block grid changed from {self.grid} to {grid} "
                f"(shape {tuple(x.shape)}); use granularity 'tensor' for streams whose shape "
                "varies, or a fresh observer per tensor"
            )
        values = to_blocks(x.detach().float(), block)
        values = values.reshape(-1, values.shape[-1])
        mask = real_elements(x.shape, block, x.device)
        if mask is not None:
            mask = mask.reshape(values.shape)
        batch = Batch(values, mask, values.amin(-1), values.amax(-1))
        if self.xmin is None:
            self.xmin, self.xmax = batch.min, batch.max
        else:
            self.xmin = torch.minimum(self.xmin, batch.min)
            self.xmax = torch.maximum(self.xmax, batch.max)
        self._fold(batch)
        self.batches += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block ``(xmin, xmax)``, shaped as the block grid, within the observed extremes."""
        if self.batches == 0:
            raise ConfigError(f"{self.name} observer has seen no data: call update() before range()")
        lo, hi = self._range()
        lo = torch.maximum(lo, self.xmin).reshape(self.grid)
        hi = torch.minimum(hi, self.xmax).reshape(self.grid)
        return lo, hi

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, zero_point)`` per block for the observed range."""
        return qparams_from_range(*self.range(), self.args)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor the observer holds (to check that its memory stays bounded)."""
        return [t for t in [self.xmin, self.xmax, *self._state()] if t is not None]

    # -- for subclasses ------------------------------------------------------------------------

    def _fold(self, batch: Batch) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` per block, flattened ``(blocks,)``."""
        raise NotImplementedError

    def _state(self) -> list[torch.Tensor]:
        return []


OBSERVERS: Registry[type[Observer]] = Registry("observer")

register_observer = OBSERVERS.register()
"""Class decorator: ``@register_observer`` adds an observer class under its ``name``."""


def get_observer(name: str, args: QuantArgs, **options) -> Observer:
    """A fresh observer ``name`` for tensors quantized with ``args``."""
    cls = OBSERVERS.get(name)
    allowed = cls.options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{name} observer: unknown option(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    return cls(args, **options)


def observed_range(x: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block ``(xmin, xmax)`` of one tensor from ``args.observer`` (min-max needs no object)."""
    if args.observer == "minmax":
        from lowbit.core.quantize import block_range

        return block_range(x, args)
    observer = get_observer(args.observer, args)
    observer.update(x)
    return observer.range()
