"""Recipe: which linear layers get which scheme, and by which method.

Layer selection uses exact module names or ``re:`` regular expressions (full match against the
module name). ``overrides`` is an ordered plan of (pattern, scheme): the first match wins, so a
mixed-precision plan is just a longer list. ``ignore`` wins over everything; ``lm_head`` and all
embeddings stay in high precision by default (embeddings are not ``nn.Linear`` and are never
selected).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.core.args import QuantArgs, parse_scheme
from lowbit.core.names import check_patterns, name_matches
from lowbit.errors import ConfigError

RECIPE_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    scheme: QuantArgs = field(default_factory=lambda: parse_scheme("w4a16"))
    method: str = "rtn"
    method_options: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[tuple[str, QuantArgs], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "scheme", parse_scheme(self.scheme))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(
            self, "overrides", tuple((p, parse_scheme(s)) for p, s in self.overrides)
        )
        check_patterns(self.targets + self.ignore + tuple(p for p, _ in self.overrides), "recipe")

    def scheme_for(self, name: str) -> QuantArgs | None:
        """The scheme for linear layer ``name``, or None if it stays in high precision."""
        if any(name_matches(p, name) for p in self.ignore):
            return None
        for pattern, scheme in self.overrides:
            if name_matches(pattern, name):
                return scheme
        if any(name_matches(p, name) for p in self.targets):
            return self.scheme
        return None

    def to_dict(self) -> dict:
        return {
            "version": RECIPE_VERSION,
            "scheme": self.scheme.to_dict(),
            "method": self.method,
            "method_options": dict(self.method_options),
            "targets": list(self.targets),
            "ignore": list(self.ignore),
            "overrides": [[p, s.to_dict()] for p, s in self.overrides],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        if not isinstance(data, dict):
            raise ConfigError("a recipe must be a JSON object")
        data = dict(data)
        version = data.pop("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise ConfigError(f"recipe version {version} is not supported (expected {RECIPE_VERSION})")
        allowed = {"scheme", "method", "method_options", "targets", "ignore", "overrides"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"recipe: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
        if "overrides" in data:
            data["overrides"] = tuple(tuple(o) for o in data["overrides"])
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"recipe file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"recipe file {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)
