"""Scheme: how a linear layer is quantized: its weights, and optionally the activations it reads
(``input_activations``) and writes (``output_activations``), as in compressed-tensors'
``QuantizationScheme``.

Presets carry the names and meanings of compressed-tensors' preset schemes (the names vLLM users
know; quant_scheme.py of compressed-tensors 0.19): ``W4A16`` int4 symmetric groups of 128,
``W8A16`` int8 symmetric groups of 128, ``W8A8`` (alias ``INT8``) int8 per-channel weights with
int8 dynamic per-token activations, ``FP8`` fp8 per-tensor weights with static per-tensor
activations, ``FP8_DYNAMIC`` fp8 per-channel weights with dynamic per-token activations, and
others below. Any short weight string (``w4g128-asym``, ``nf4``) is a weight-only scheme.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.core.args import ARGS_HELP, QuantArgs, parse_args
from lowbit.core.records import from_dict
from lowbit.errors import ConfigError

ACTIVATION_GRANULARITIES = ("tensor", "token", "group")


def _int(bits: int, **fields) -> QuantArgs:
    return QuantArgs(f"int{bits}", **fields)


def _fp8(**fields) -> QuantArgs:
    return QuantArgs("fp8_e4m3", **fields)


_CHANNEL = dict(granularity="channel", group_size=None)
_TENSOR = dict(granularity="tensor", group_size=None)
_TOKEN_DYNAMIC = dict(granularity="token", group_size=None, dynamic=True)


@dataclass(frozen=True)
class Scheme:
    weights: QuantArgs
    input_activations: QuantArgs | None = None
    output_activations: QuantArgs | None = None

    def __post_init__(self):
        if self.weights is None:
            raise ConfigError("a scheme needs weights (activation-only schemes are not supported)")
        object.__setattr__(self, "weights", parse_args(self.weights))
        if self.weights.dynamic:
            raise ConfigError("weights cannot be dynamic: set dynamic only for activations")
        for field in ("input_activations", "output_activations"):
            value = getattr(self, field)
            if value is None:
                continue
            value = parse_args(value)
            if value.granularity not in ACTIVATION_GRANULARITIES:
                raise ConfigError(
                    f"{field}: granularity {value.granularity!r} does not apply to activations; "
                    f"use one of {', '.join(ACTIVATION_GRANULARITIES)}"
                )
            if value.granularity == "token" and not value.dynamic:
                raise ConfigError(f"{field}: per-token scales are computed at run time; set dynamic=true")
            object.__setattr__(self, field, value)

    @property
    def quantizes_activations(self) -> bool:
        return self.input_activations is not None or self.output_activations is not None

    def name(self) -> str:
        """Weight-only: the weights' short name (``w4g128``). With activations: the preset name
        when the scheme is one, else the weights' name plus the activations."""
        if not self.quantizes_activations:
            return self.weights.name()
        for preset, scheme in PRESETS.items():
            if scheme == self:
                return preset
        head = self.weights.name()
        if self.input_activations is not None:
            head += f"+in:{self.input_activations.describe().replace(' ', '-')}"
        if self.output_activations is not None:
            head += f"+out:{self.output_activations.describe().replace(' ', '-')}"
        return head

    def to_dict(self) -> dict:
        return {
            "weights": self.weights.to_dict(),
            "input_activations": None if self.input_activations is None else self.input_activations.to_dict(),
            "output_activations": None if self.output_activations is None else self.output_activations.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Scheme:
        return from_dict(cls, data, "scheme")


PRESETS: dict[str, Scheme] = {
    "W4A16": Scheme(_int(4, group_size=128)),
    "W4A16_ASYM": Scheme(_int(4, symmetric=False, group_size=128)),
    "W8A16": Scheme(_int(8, group_size=128)),
    "W8A8": Scheme(_int(8, **_CHANNEL), _int(8, **_TOKEN_DYNAMIC)),
    "W4A8": Scheme(_int(4, group_size=128), _int(8, **_TOKEN_DYNAMIC)),
    "W4AFP8": Scheme(_int(4, group_size=128), _fp8(**_TOKEN_DYNAMIC)),
    "FP8": Scheme(_fp8(**_TENSOR), _fp8(**_TENSOR)),
    "FP8_DYNAMIC": Scheme(_fp8(**_CHANNEL), _fp8(**_TOKEN_DYNAMIC)),
    "FP8_BLOCK": Scheme(
        _fp8(granularity="block", group_size=None, block_shape=(128, 128)),
        _fp8(group_size=128, dynamic=True),
    ),
}
ALIASES = {"INT8": "W8A8"}

SCHEME_HELP = f"a preset ({', '.join([*PRESETS, *ALIASES])}) or a weight scheme {ARGS_HELP}"


def parse_scheme(spec: str | dict | QuantArgs | Scheme) -> Scheme:
    """A Scheme from a preset name (any case), a short weight string, a dict (``Scheme`` fields,
    or ``QuantArgs`` fields for weights alone), QuantArgs (weights alone) or a Scheme."""
    if isinstance(spec, Scheme):
        return spec
    if isinstance(spec, QuantArgs):
        return Scheme(spec)
    if isinstance(spec, dict):
        if "weights" in spec:
            return Scheme.from_dict(spec)
        return Scheme(QuantArgs.from_dict(spec))
    if not isinstance(spec, str):
        raise ConfigError(f"a scheme must be a string or a mapping, got {spec!r}")
    key = spec.strip().upper().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    try:
        return Scheme(parse_args(spec))
    except ConfigError:
        raise ConfigError(f"unknown scheme {spec!r}: use {SCHEME_HELP}") from None
