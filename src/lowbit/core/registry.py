"""Named registries: formats, observers, kernels, methods and bundled models each keep one.

A name is registered once (a second registration is a programming error, not a silent
overwrite); looking up an unknown name is a user error that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from lowbit.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object map that refuses duplicates. ``kind`` names the entries in errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def register(self, name_of: Callable[[T], str] = lambda item: item.name) -> Callable[[T], T]:
        """A decorator: ``@REGISTRY.register()`` adds the decorated object under ``item.name``."""
        return lambda item: self.add(name_of(item), item)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items))}"
            ) from None

    def remove(self, name: str) -> T:
        """Take ``name`` out again (tests register temporary entries)."""
        return self._items.pop(name)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self):
        return self._items.items()

    def values(self):
        return self._items.values()
