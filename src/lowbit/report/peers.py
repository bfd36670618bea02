"""Peers' points for the size-versus-KL plot: other tools' quantized models, scored elsewhere.

A peers file is JSON, ``{"peers": [...], "note": "..."}`` or a bare list, each entry
``{"name": ..., "bits": ... or "size_mb": ..., "kl": ...}`` (``bits_per_weight``/``bpw`` and
``mean_kl`` are accepted too), or CSV with a header naming the same columns. The note says
where the numbers come from; the report prints it under the plot, since peers measured on
other text are comparable in shape, not in absolute value.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import ConfigError

_ALIASES = {"bits": ("bits", "bits_per_weight", "bpw"), "size_mb": ("size_mb", "mb"), "kl": ("kl", "mean_kl")}


@dataclass(frozen=True)
class Peer:
    name: str
    kl: float
    bits: float | None = None
    size_mb: float | None = None


@dataclass(frozen=True)
class Peers:
    points: list[Peer]
    note: str | None = None


def read_peers(path: str | Path) -> Peers:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--peers {path}: cannot read it ({err})") from None
    note = None
    if path.suffix.lower() == ".csv":
        entries = list(csv.DictReader(text.splitlines()))
    else:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"--peers {path}: not JSON ({str(err).splitlines()[0]}); give JSON or a .csv") from None
        if isinstance(data, dict):
            note = data.get("note")
            data = data.get("peers")
        if not isinstance(data, list):
            raise ConfigError(f"--peers {path}: expected a list of peers or {{\"peers\": [...]}}")
        entries = data
    points = [_peer(path, i, e) for i, e in enumerate(entries)]
    return Peers(points, note if isinstance(note, str) else None)


def _peer(path: Path, i: int, entry) -> Peer:
    if not isinstance(entry, dict) or not entry.get("name"):
        raise ConfigError(f"--peers {path}: entry {i + 1} has no name")
    values = {field: _value(entry, names) for field, names in _ALIASES.items()}
    if values["kl"] is None or (values["bits"] is None and values["size_mb"] is None):
        raise ConfigError(f"--peers {path}: {entry['name']!r} needs kl and bits (or size_mb)")
    return Peer(str(entry["name"]), values["kl"], values["bits"], values["size_mb"])


def _value(entry: dict, names: tuple[str, ...]) -> float | None:
    for name in names:
        raw = entry.get(name)
        if raw in (None, ""):
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None
    return None
