"""Weight-quantization methods: a registry, what each method needs, and the statistics it gets.

A method declares ``needs``; the pipeline provides it:

- ``"none"``: data-free (RTN, HQQ). No calibration forward passes.
- ``"hessian"``: ``HessianStats`` per linear (GPTQ), from that linear's inputs.
- ``"inputs"``: ``InputStats`` per linear (AWQ): a bounded sample of input rows and the mean
  absolute value of every input channel.

Linears that read the same input tensor (q/k/v, gate/up) share one stats object.
A method never knows how its result is saved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.core.args import QuantArgs
from lowbit.core.records import from_dict
from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import ConfigError


@dataclass
class HessianStats:
    """H = (2 / n) * sum_i x_i x_i^T over the n input rows seen (float32, K x K)."""

    hessian: torch.Tensor
    rows: int = 0

    @classmethod
    def empty(cls, features: int, device=None) -> "HessianStats":
        return cls(torch.zeros(features, features, dtype=torch.float32, device=device))

    def add(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs ``(..., K)`` into the running average."""
        x = x.reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float32)
        n = x.shape[0]
        total = self.rows + n
        self.hessian.mul_(self.rows / total)
        x = x * (2.0 / total) ** 0.5
        self.hessian.addmm_(x.t(), x)
        self.rows = total


@dataclass
class InputStats:
    """Every ``stride``-th input row (at most ``max_rows`` kept) and the running mean of |x|
    per input channel over all rows. The pipeline sets ``stride`` from the calibration size so
    the sample spreads over all samples and positions."""

    max_rows: int
    stride: int = 1
    sample: list[torch.Tensor] = field(default_factory=list)
    sampled: int = 0
    abs_sum: torch.Tensor | None = None
    rows: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        s = x.abs().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.rows += x.shape[0]
        if self.sampled < self.max_rows:
            take = x[:: self.stride][: self.max_rows - self.sampled]
            self.sample.append(take.clone())
            self.sampled += take.shape[0]

    def divide(self, s: torch.Tensor) -> None:
        """The statistics of inputs divided per channel by ``s`` (scales folded upstream)."""
        self.sample = [t / s.to(t) for t in self.sample]
        if self.abs_sum is not None:
            self.abs_sum = self.abs_sum / s.to(self.abs_sum)

    @property
    def inputs(self) -> torch.Tensor:
        """The sampled rows, ``(rows, K)``."""
        return torch.cat(self.sample)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(1, self.rows)


@dataclass
class Target:
    """One linear layer to quantize inside a decoder layer."""

    name: str  # full module name in the model, e.g. model.layers.3.self_attn.q_proj
    local_name: str  # name inside the decoder layer, e.g. self_attn.q_proj
    module: nn.Linear
    args: QuantArgs


@dataclass
class LayerResult:
    qweight: QuantizedTensor
    loss: float  # the method's own objective for this weight (for progress and reports)


class Method:
    """Base class. Subclasses set ``name``, ``needs``, ``Config`` and implement
    ``quantize_weight``; layer-level methods (AWQ) override ``quantize_layer``."""

    name: ClassVar[str]
    needs: ClassVar[str] = "none"
    Config: ClassVar[type]

    def __init__(self, config: Any = None):
        if config is None:
            config = self.Config()
        elif isinstance(config, dict):
            config = from_dict(self.Config, config, f"{self.name} options")
        self.config = config

    def new_stats(self, features: int, total_rows: int, device=None):
        """An empty statistics object for one input group of ``features`` channels, to receive
        ``total_rows`` rows in all. Input samples keep ``config.max_input_rows`` rows (4096 if
        the method's config does not set it)."""
        if self.needs == "hessian":
            return HessianStats.empty(features, device)
        if self.needs == "inputs":
            max_rows = getattr(self.config, "max_input_rows", 4096)
            return InputStats(max_rows=max_rows, stride=max(1, total_rows // max_rows))
        raise ValueError(f"method {self.name} needs no statistics")

    def quantize_weight(self, weight: torch.Tensor, args: QuantArgs, stats: Any) -> LayerResult:
        raise NotImplementedError

    def quantize_layer(
        self, layer: nn.Module, targets: list[Target], stats: dict[str, Any], arch: Any
    ) -> dict[str, LayerResult]:
        """Quantize every target of one decoder layer; ``stats`` is keyed by ``local_name``."""
        return {
            t.local_name: self.quantize_weight(t.module.weight.data, t.args, stats.get(t.local_name))
            for t in targets
        }

    def options(self) -> dict:
        return dataclasses.asdict(self.config)


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, config: Any = None) -> Method:
    _load_builtin_methods()
    try:
        cls = METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}"
        ) from None
    return cls(config)


def _load_builtin_methods() -> None:
    import importlib

    for module in ("rtn", "gptq", "awq", "hqq"):
        try:
            importlib.import_module(f"lowbit.methods.{module}")
        except ModuleNotFoundError as e:  # a method not written yet
            if e.name != f"lowbit.methods.{module}":
                raise
