"""Strict conversion between config dataclasses and plain dicts (JSON, command-line strings).

``from_dict`` checks every value against its field's type. Text is parsed by that type, so
``--option optimize_scale=False`` gives ``False`` (never the truthy string "False"):

- bool: true/false, yes/no, on/off, 1/0 (any case)
- int, float: decimal text (an int field refuses 2.5; a float field takes 2)
- tuple[str, ...] (or a fixed tuple): a JSON list or comma-separated items
- X | None (Optional): ``none`` or ``null`` gives None, anything else is parsed as X

Fields of any other type (nested records, mappings) are passed to the class as they are, for
its own ``__post_init__`` to check.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

from lowbit.errors import ConfigError

T = TypeVar("T")

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null")


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
    """Build ``cls`` from ``data``, rejecting unknown keys (a typo is an error, not a default)
    and converting each value to its field's type (module docstring); a value that does not fit
    raises one ConfigError naming the key, the expected type and the allowed keys."""
    what = what or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(
            f"{what}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(fields) or 'none'}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        try:
            kwargs[name] = convert(value, hints.get(name, Any))
        except (TypeError, ValueError):
            raise ConfigError(
                f"{what}: {name} expects {type_name(hints.get(name, Any))}, got {value!r}; "
                f"allowed: {', '.join(fields)}"
            ) from None
    return cls(**kwargs)


def convert(value: Any, hint: Any) -> Any:
    """``value`` (a JSON value or text) as type ``hint``; TypeError or ValueError if it does not
    fit. Hints this module does not know are returned unchanged."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE
                             and len(options) < len(args) and str not in options):
            if len(options) < len(args):
                return None
            raise ValueError("None is not allowed")
        for option in options:
            try:
                return convert(value, option)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{value!r} fits none of {args}")
    if hint is bool:
        return _bool(value)
    if hint is int:
        if isinstance(value, str):
            return int(value.strip())
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if hint is float:
        if isinstance(value, str):
            text = value.strip()
            if text.lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
                raise ValueError("not a finite number")
            return float(text)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin is tuple:
        items = _items(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(v, args[0]) for v in items)
        if args and len(items) != len(args):
            raise ValueError(f"expected {len(args)} items")
        return tuple(convert(v, a) for v, a in zip(items, args)) if args else tuple(items)
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(text)
    raise TypeError


def _items(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return [list(v) if isinstance(v, tuple) else v for v in value]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            parsed = json.loads(text)
            if not isinstance(parsed, list):
                raise TypeError
            return parsed
        return [item.strip() for item in text.split(",") if item.strip()]
    raise TypeError


def type_name(hint: Any) -> str:
    """How an expected type reads in an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or none" if len(names) < len(args) else "")
    if hint is bool:
        return "a boolean (true/false, yes/no, 1/0)"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "text"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_name(args[0]).removeprefix('a ').removeprefix('an ')} (comma-separated or JSON)"
        return f"a list of {len(args)} items"
    return getattr(hint, "__name__", str(hint))
