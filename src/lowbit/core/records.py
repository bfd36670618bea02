"""Strict conversion between config dataclasses and plain dicts (JSON)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from lowbit.errors import ConfigError

T = TypeVar("T")


def to_dict(obj) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def from_dict(cls: type[T], data: dict[str, Any], what: str | None = None) -> T:
    """Build ``cls`` from ``data``, rejecting unknown keys (a typo is an error, not a default)."""
    what = what or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{what}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints.get(name)
        if isinstance(value, list) and _is_tuple_hint(hint):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[name] = value
    return cls(**kwargs)


def _is_tuple_hint(hint) -> bool:
    if hint is None:
        return False
    if typing.get_origin(hint) is tuple:
        return True
    return any(typing.get_origin(a) is tuple for a in typing.get_args(hint))
