"""Architecture knowledge as data: where the decoder layers are and where scales fold.

A ``ScaleMapping`` says that per-input-channel scales ``s`` on the ``balance`` linears
(W -> W * s) can be undone exactly in the ``smooth`` module that produces their input
(a norm: weight -> weight / s; a linear: its output rows / s). AWQ and SmoothQuant use these.
Names are local to one decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ScaleMapping:
    smooth: str
    balance: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    layers: str
    """Attribute path of the decoder-layer list, e.g. ``model.layers``."""
    mappings: tuple[ScaleMapping, ...]
    norm_offset: float = 0.0
    """Norms compute ``x * (norm_offset + weight)`` (Gemma: 1.0)."""


_LLAMA_MAPPINGS = (
    ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleMapping("mlp.up_proj", ("mlp.down_proj",)),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), "model.layers", _LLAMA_MAPPINGS),
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHITECTURES for t in a.model_types)


def architecture_for(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported (supported: "
        f"{', '.join(supported_model_types())}); add an Architecture entry for it in "
        "lowbit/models/arch.py"
    )


def get_architecture(model: nn.Module) -> Architecture:
    return architecture_for(getattr(model.config, "model_type", type(model).__name__))


def decoder_layers(model: nn.Module, arch: Architecture | None = None) -> nn.ModuleList:
    arch = arch or get_architecture(model)
    module = model
    for part in arch.layers.split("."):
        module = getattr(module, part)
    return module
