"""Module-name patterns: an exact name, or ``re:`` + a regular expression (full match)."""

from __future__ import annotations

import re

from lowbit.errors import ConfigError


def name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name


def check_patterns(patterns, what: str) -> None:
    """Raise ConfigError naming the first ``re:`` pattern that does not compile."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise ConfigError(f"{what}: bad regular expression {pattern!r}: {e}") from None
