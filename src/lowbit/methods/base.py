"""Stages of a recipe, their registry, and the statistics they ask for.

A recipe is an ordered list of stages (``resolve_stages("awq+gptq")``):

- a ``Transform`` changes the float model while keeping its function. Given the balance linears
  of one scale mapping (``smooth -> balance``, see ``lowbit.models.arch``) and the statistics of
  their shared input, it returns per-input-channel scales ``s`` (or None); the pipeline folds them
  (balance W -> W * s, smooth output / s) and divides the statistics by ``s``. AWQ's scale search
  is one; SmoothQuant will be another.
- a ``Quantizer`` turns one linear's weight into a ``QuantizedTensor``: RTN, GPTQ, HQQ, AWQ's clip
  search. A recipe has exactly one, last.

Each stage declares the statistics it needs as a set of names served by ``STATISTICS``:
``"hessian"`` (H = 2/n sum x x^T, ``HessianStats``) and ``"inputs"`` (a strided sample of input
rows and mean |x| per channel, ``InputStats``). Linears that read the same input tensor (q/k/v,
gate/up) share one ``LinearStats``. A stage never knows how its result is saved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.core.args import QuantArgs
from lowbit.core.records import from_dict
from lowbit.core.registry import Registry
from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import ConfigError

# Input rows an ``InputStats`` keeps when its stage's config does not say.
DEFAULT_INPUT_ROWS = 4096


# -- statistics ----------------------------------------------------------------------------------


@dataclass
class HessianStats:
    """H = (2 / n) * sum_i x_i x_i^T over the n input rows seen (float32, K x K)."""

    hessian: torch.Tensor
    rows: int = 0

    @classmethod
    def empty(cls, features: int, device=None) -> HessianStats:
        return cls(torch.zeros(features, features, dtype=torch.float32, device=device))

    @classmethod
    def new(cls, features: int, total_rows: int, max_rows: int, device=None) -> HessianStats:
        return cls.empty(features, device)

    def add(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs ``(..., K)`` into the running average."""
        x = x.reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float32)
        n = x.shape[0]
        total = self.rows + n
        self.hessian.mul_(self.rows / total)
        x = x * (2.0 / total) ** 0.5
        self.hessian.addmm_(x.t(), x)
        self.rows = total

    def divide(self, s: torch.Tensor) -> None:
        """The Hessian of inputs divided per channel by ``s``: H / (s s^T)."""
        s = s.to(self.hessian)
        self.hessian.div_(s[:, None] * s[None, :])


@dataclass
class InputStats:
    """Every ``stride``-th input row (at most ``max_rows`` kept) and the running mean of |x|
    per input channel over all rows. ``new`` sets ``stride`` from the calibration size so
    the sample spreads over all samples and positions."""

    max_rows: int
    stride: int = 1
    sample: list[torch.Tensor] = field(default_factory=list)
    sampled: int = 0
    abs_sum: torch.Tensor | None = None
    rows: int = 0

    @classmethod
    def new(cls, features: int, total_rows: int, max_rows: int, device=None) -> InputStats:
        return cls(max_rows=max_rows, stride=max(1, total_rows // max_rows))

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


def relative_output_error(weight: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    """The measure every linear reports: tr(D H D^T) / tr(W H W^T) with D = W - Q, i.e.
    ||X W^T - X Q^T||^2 / ||X W^T||^2 for H = 2/n X^T X. ``q``: the dequantized weight."""
    w = weight.to(hessian.device, torch.float32)
    d = w - q.to(hessian.device, torch.float32)
    den = float(((w @ hessian) * w).sum())
    return float(((d @ hessian) * d).sum()) / den if den > 0 else 0.0


STATISTICS: Registry[type] = Registry("statistic")
STATISTICS.add("hessian", HessianStats)
STATISTICS.add("inputs", InputStats)


class LinearStats(dict):
    """The statistics of one input tensor, by name: ``LinearStats(hessian=HessianStats(...))``,
    read as ``stats["hessian"]``."""

    @classmethod
    def new(cls, needs, features: int, total_rows: int, max_rows: int = DEFAULT_INPUT_ROWS,
            device=None) -> LinearStats:
        return cls({n: STATISTICS.get(n).new(features, total_rows, max_rows, device) for n in sorted(needs)})

    def add(self, x: torch.Tensor) -> None:
        for stat in self.values():
            stat.add(x)

    def divide(self, s: torch.Tensor) -> None:
        for stat in self.values():
            stat.divide(s)

    def require(self, name: str, stage: str) -> Any:
        stat = self.get(name)
        if stat is None or stat.rows == 0:
            raise ConfigError(
                f"{stage} needs calibration inputs ({name}) for every linear it quantizes; none "
                "reached this one (linears outside the decoder layers: ignore them or use rtn/hqq)"
            )
        return stat


# -- stages --------------------------------------------------------------------------------------


@dataclass
class Target:
    """One linear layer to quantize inside a decoder layer."""

    name: str  # full module name in the model, e.g. model.layers.3.self_attn.q_proj
    local_name: str  # name inside the decoder layer, e.g. self_attn.q_proj
    module: nn.Linear
    args: QuantArgs  # how its weight is quantized (the scheme's weights)
    scheme: Any = None  # the whole lowbit.core.scheme.Scheme (activations too), when known


@dataclass
class LayerResult:
    qweight: QuantizedTensor
    objective: float
    """The stage's own objective for this weight, named by its ``objective`` attribute."""


class Stage:
    """Base class. Subclasses set ``name``, ``needs`` (statistic names) and ``Config`` (a frozen
    dataclass of options)."""

    name: ClassVar[str]
    kind: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    Config: ClassVar[type]

    def __init__(self, config: Any = None):
        if config is None:
            config = self.Config()
        elif isinstance(config, dict):
            config = from_dict(self.Config, config, f"{self.name} options")
        self.config = config

    @property
    def max_input_rows(self) -> int:
        return getattr(self.config, "max_input_rows", DEFAULT_INPUT_ROWS)

    def options(self) -> dict:
        return dataclasses.asdict(self.config)


class Transform(Stage):
    """Changes the float model without changing its function: returns scales to fold."""

    kind = "transform"

    def scales(self, weights: list[tuple[torch.Tensor, QuantArgs]], stats: LinearStats) -> torch.Tensor | None:
        """Per-input-channel scales ``s`` (K,) for balance linears ``weights`` (out, K) reading
        one input whose statistics are ``stats``; None to leave them as they are."""
        raise NotImplementedError


class Quantizer(Stage):
    """Turns a weight into a QuantizedTensor. ``objective`` names what ``LayerResult.objective``
    measures."""

    kind = "quantizer"
    objective: ClassVar[str]

    def quantize_weight(self, weight: torch.Tensor, args: QuantArgs, stats: LinearStats | None) -> LayerResult:
        raise NotImplementedError

    def quantize_target(self, target: Target, stats: LinearStats | None) -> LayerResult:
        """Quantize one linear of a decoder layer (a stage may treat some names differently)."""
        return self.quantize_weight(target.module.weight.data, target.args, stats)


STAGES: Registry[type[Stage]] = Registry("method")
register_stage = STAGES.register()

# One-word methods for users: ``awq`` is AWQ's scale search, then (when no quantizer follows)
# its clip search with round-to-nearest.
ALIASES: dict[str, tuple[str, ...]] = {"awq": ("awq_scale",)}
DEFAULT_QUANTIZER = {"awq": "awq_clip"}
BUILTIN_MODULES = ("rtn", "gptq", "awq", "hqq")


def _load_builtin_stages() -> None:
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(f"lowbit.methods.{module}")


def stage_names(method: str) -> list[str]:
    """The stage names of a method string such as ``gptq``, ``awq`` or ``awq+gptq``."""
    _load_builtin_stages()
    if not isinstance(method, str) or not method.strip():
        raise ConfigError(f"method must be a name such as rtn, gptq, awq or awq+gptq, got {method!r}")
    tokens = [t.strip().lower() for t in method.split("+")]
    names: list[str] = []
    for i, token in enumerate(tokens):
        if token in ALIASES:
            names.extend(ALIASES[token])
            if i == len(tokens) - 1 and token in DEFAULT_QUANTIZER:
                names.append(DEFAULT_QUANTIZER[token])
        elif token in STAGES:
            names.append(token)
        else:
            known = sorted(set(STAGES) | set(ALIASES))
            raise ConfigError(f"unknown method {token!r} in {method!r}; available: {', '.join(known)} "
                              "(join a transform and a quantizer with +, e.g. awq+gptq)")
    kinds = [STAGES.get(n).kind for n in names]
    if kinds.count("quantizer") != 1 or kinds[-1] != "quantizer":
        raise ConfigError(
            f"method {method!r}: a recipe is transforms followed by exactly one weight quantizer "
            f"(rtn, gptq, hqq, awq_clip), e.g. awq+gptq; got stages {' -> '.join(names)}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"method {method!r} repeats a stage")
    return names


def option_owners(names: list[str], options: dict[str, Any], method: str) -> dict[str, list[int]]:
    """Which of the stages ``names`` each option goes to: ``stage.key`` (or ``alias.key``) to
    that stage, a bare ``key`` to every stage whose config has that field."""
    fields = {n: {f.name for f in dataclasses.fields(STAGES.get(n).Config)} for n in names}
    owners: dict[str, list[int]] = {}
    for key in options:
        prefix, dot, bare = key.rpartition(".")
        if dot:
            named = set(ALIASES.get(prefix, ()) + (DEFAULT_QUANTIZER.get(prefix, ""), prefix))
            chosen = [i for i, n in enumerate(names) if n in named]
            if not chosen:
                raise ConfigError(f"option {key!r}: {prefix!r} is not a stage of method {method!r} "
                                  f"(stages: {', '.join(names)})")
            chosen = [i for i in chosen if bare in fields[names[i]]] or chosen
        else:
            chosen = [i for i, n in enumerate(names) if bare in fields[n]]
        if not chosen:
            allowed = sorted({f for n in names for f in fields[n]})
            raise ConfigError(f"unknown option {key!r} for method {method!r}; options: "
                              f"{', '.join(allowed) or 'none'}")
        owners[key] = chosen
    return owners


def resolve_stages(method: str, options: dict[str, Any] | None = None) -> list[Stage]:
    """Stage objects for a method string and its options (validated: a typo is an error)."""
    names = stage_names(method)
    options = dict(options or {})
    per_stage: list[dict[str, Any]] = [{} for _ in names]
    for key, chosen in option_owners(names, options, method).items():
        for i in chosen:
            per_stage[i][key.rpartition(".")[2]] = options[key]
    return [STAGES.get(n)(opts) for n, opts in zip(names, per_stage, strict=True)]


def typed_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with each value as its stage's config holds it (text from a command line
    becomes the field's type: ``"false"`` -> False)."""
    stages = resolve_stages(method, options)
    owners = option_owners(stage_names(method), options, method)
    return {key: getattr(stages[owners[key][0]].config, key.rpartition(".")[2]) for key in options}


def get_method(name: str, config: Any = None) -> Stage:
    """One stage by its registered name, with its options (a dict or its Config)."""
    _load_builtin_stages()
    return STAGES.get(name)(config)
