"""Recipe: which linear layers get which scheme, and the ordered stages that quantize them.

Layer selection uses exact module names or ``re:`` regular expressions (full match against the
module name). ``overrides`` is an ordered plan of (pattern, scheme): the first match wins, so a
mixed-precision plan is just a longer list. ``ignore`` wins over everything; ``lm_head`` and all
embeddings stay in high precision by default (embeddings are not ``nn.Linear`` and are never
selected).

``method`` names the stages, joined by ``+``: transforms that keep the model's function (AWQ's
scales) followed by one weight quantizer (``rtn``, ``gptq``, ``hqq``, ``awq_clip``). ``awq``
alone is ``awq_scale+awq_clip``; ``awq+gptq`` is ``awq_scale+gptq``. ``method_options`` go to
every stage whose options have that name, or to one stage with ``stage.option`` (e.g.
``gptq.act_order``). Everything is validated when the recipe is built, before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lowbit import defaults
from lowbit.core.names import check_patterns, name_matches
from lowbit.core.scheme import Scheme, parse_scheme
from lowbit.errors import ConfigError, LowbitError
from lowbit.methods.base import Stage, resolve_stages, stage_names, typed_options
from lowbit.observers import OBSERVERS

RECIPE_VERSION = 2
DEFAULT_IGNORE = ("lm_head",)


@dataclass(frozen=True)
class Recipe:
    scheme: Scheme = field(default_factory=lambda: parse_scheme(defaults.SCHEME))
    method: str = defaults.METHOD
    method_options: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    overrides: tuple[tuple[str, Scheme], ...] = ()
    file_type: str | None = None
    """A llama.cpp file type (``Q4_K_M``; ``--scheme gguf:Q4_K_M``): each linear gets the GGUF
    grid llama.cpp's rules give it, fallbacks included (``lowbit.export.gguf_types``), resolved
    into ``overrides`` once the model is known (``with_file_type_plan``). GPTQ's
    ``scale_search`` is on for file types unless the options set it."""

    def __post_init__(self):
        if isinstance(self.scheme, str) and self.scheme.strip().lower().startswith("gguf:"):
            object.__setattr__(self, "file_type", self.scheme.strip()[5:])
        if self.file_type is not None:
            from lowbit.export.gguf_types import FILE_TYPES, canonical_file_type

            try:
                ft = canonical_file_type(self.file_type)
            except LowbitError as err:
                raise ConfigError(str(err)) from None
            if FILE_TYPES[ft] in ("F32", "F16", "BF16"):
                raise ConfigError(f"gguf:{ft} is a float file type: export a float model with llama.cpp's converter")
            object.__setattr__(self, "file_type", ft)
            object.__setattr__(self, "scheme", parse_scheme(FILE_TYPES[ft]))
            # llama.cpp chooses scales on these grids by an importance-weighted search; GPTQ
            # does the same unless told otherwise (documented in docs/export/gguf.md)
            if "gptq" in stage_names(self.method) and not any(
                    k.rpartition(".")[2] == "scale_search" for k in self.method_options):
                object.__setattr__(self, "method_options", {**self.method_options, "gptq.scale_search": True})
        object.__setattr__(self, "scheme", parse_scheme(self.scheme))
        object.__setattr__(self, "targets", _patterns(self.targets, "targets"))
        object.__setattr__(self, "ignore", _patterns(self.ignore, "ignore"))
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"method_options must be a mapping, got {self.method_options!r}")
        try:
            overrides = tuple((p, parse_scheme(s)) for p, s in self.overrides)
        except (TypeError, ValueError):
            raise ConfigError("overrides must be a list of [pattern, scheme] pairs") from None
        object.__setattr__(self, "overrides", overrides)
        check_patterns(self.targets + self.ignore + tuple(p for p, _ in self.overrides), "recipe")
        stage_names(self.method)  # a bad method string fails here
        object.__setattr__(self, "method", "+".join(t.strip().lower() for t in self.method.split("+")))
        # Unknown stages or options fail here, not after loading a model; values get their types.
        object.__setattr__(self, "method_options", typed_options(self.method, self.method_options))
        for scheme in (self.scheme, *(s for _, s in self.overrides)):
            for args in (scheme.weights, scheme.input_activations, scheme.output_activations):
                if args is not None and not args.dynamic:
                    OBSERVERS.get(args.observer)

    @property
    def stages(self) -> list[str]:
        """The stage names, in the order they run."""
        return stage_names(self.method)

    def build_stages(self) -> list[Stage]:
        """Fresh stage objects with their options."""
        return resolve_stages(self.method, self.method_options)

    def scheme_for(self, name: str) -> Scheme | None:
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
            "stages": [{"name": s.name, "kind": s.kind, "options": s.options()} for s in self.build_stages()],
            "targets": list(self.targets),
            "ignore": list(self.ignore),
            "overrides": [[p, s.to_dict()] for p, s in self.overrides],
            "file_type": self.file_type,
        }

    def with_file_type_plan(self, linears: dict[str, tuple[int, int, int]], gguf_arch: str,
                            n_layers: int) -> Recipe:
        """For a recipe with ``file_type``: exact-name overrides giving each selected linear
        (name -> (decoder layer or -1, out_features, in_features)) its GGUF grid; a linear whose
        row fits no GGUF block type is ignored (kept in float, as llama.cpp writes F16)."""
        if self.file_type is None:
            return self
        import gguf

        from lowbit.export.gguf_types import tensor_role, tensor_type

        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)
        names = gguf.get_tensor_name_map(arch, n_layers)
        overrides, ignore = [], []
        for name, (_, _, cols) in linears.items():
            if self.scheme_for(name) is None:
                continue
            gname = names.get_name(name + ".weight", try_suffixes=(".weight",))
            if gname is None:
                raise ConfigError(f"{name} has no GGUF name in architecture {gguf_arch}")
            role, i_layer = tensor_role(gname)
            choice = tensor_type(self.file_type, "output" if role == "output" else role, i_layer, n_layers, cols)
            if choice.type in ("F16", "F32", "BF16"):
                ignore.append(name)
            else:
                overrides.append((name, parse_scheme(choice.type)))
        return replace(self, overrides=tuple(overrides) + self.overrides, ignore=self.ignore + tuple(ignore))

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """A recipe from its dict (version 1 or 2). ``stages``, as written by ``to_dict``, is
        what ``method`` and ``method_options`` resolve to and is checked against them."""
        if not isinstance(data, dict):
            raise ConfigError("a recipe must be a JSON object")
        data = dict(data)
        version = data.pop("version", RECIPE_VERSION)
        if version not in (1, RECIPE_VERSION):
            raise ConfigError(f"recipe version {version} is not supported (expected {RECIPE_VERSION})")
        allowed = {"scheme", "method", "method_options", "targets", "ignore", "overrides", "stages", "file_type"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"recipe: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
        stages = data.pop("stages", None)
        if "overrides" in data:
            if not isinstance(data["overrides"], list):
                raise ConfigError("recipe overrides must be a list of [pattern, scheme] pairs")
            data["overrides"] = tuple(tuple(o) if isinstance(o, list) else o for o in data["overrides"])
        recipe = cls(**data)
        if stages is not None:
            names = [s.get("name") if isinstance(s, dict) else s for s in stages]
            if names != recipe.stages:
                raise ConfigError(f"recipe stages {names} do not match method {recipe.method!r} "
                                  f"({recipe.stages}); give one of them")
        return recipe

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"recipe file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"recipe file {path} cannot be read: {e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"recipe file {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)


def _patterns(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        value = tuple(value)
    except TypeError:
        raise ConfigError(f"recipe {what} must be a list of names or re: patterns") from None
    if not all(isinstance(p, str) for p in value):
        raise ConfigError(f"recipe {what} must be a list of names or re: patterns, got {list(value)}")
    return value
