"""Errors a user can cause. Each message names the problem and the fix in one line."""


class LowbitError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(LowbitError, ValueError):
    """A scheme, recipe or option is invalid."""


class ModelLoadError(LowbitError):
    """A model path, file or architecture cannot be used."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture has no mapping in lowbit."""


class OutputError(LowbitError):
    """The output path cannot be written, or writing it would destroy something."""


class NonFiniteError(LowbitError):
    """A weight, scale or model output holds NaN or Inf."""
