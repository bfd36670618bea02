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
    gguf_arch: str | None = None
    """llama.cpp's name for the architecture (``general.architecture`` of a GGUF file)."""


_LLAMA_MAPPINGS = (
    ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleMapping("mlp.up_proj", ("mlp.down_proj",)),
)

# Gemma 3 puts a norm on each side of every sublayer. post_attention_layernorm and
# post_feedforward_layernorm normalise a sublayer's *output* before the residual add and feed no
# linear, so they smooth nothing; the MLP reads pre_feedforward_layernorm. Its RMSNorm computes
# x_hat * (1 + w), hence norm_offset=1.0. q_norm / k_norm act on q_proj / k_proj outputs, after
# the columns that scales touch, so input_layernorm -> q, k, v still folds exactly.
_GEMMA3_MAPPINGS = (
    ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleMapping("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleMapping("mlp.up_proj", ("mlp.down_proj",)),
)

# Phi-3 fuses q/k/v into one qkv_proj and gate/up into one gate_up_proj. Only the norm mappings
# fit whole modules: v -> o would scale just the v rows of qkv_proj, and up -> down just the up
# half of gate_up_proj (the gate half passes through an activation), which a whole-module mapping
# cannot say. They are left out rather than folded wrongly.
_PHI3_MAPPINGS = (
    ScaleMapping("input_layernorm", ("self_attn.qkv_proj",)),
    ScaleMapping("post_attention_layernorm", ("mlp.gate_up_proj",)),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), "model.layers", _LLAMA_MAPPINGS, gguf_arch="llama"),
    # Llama's layer layout: Mistral (sliding window only changes the attention mask), Qwen2
    # (biases on q/k/v, which folding leaves alone on the balance side) and Qwen3 (q_norm / k_norm
    # after q_proj / k_proj, as in Gemma 3).
    Architecture("mistral", ("mistral",), "model.layers", _LLAMA_MAPPINGS, gguf_arch="llama"),
    Architecture("qwen2", ("qwen2",), "model.layers", _LLAMA_MAPPINGS, gguf_arch="qwen2"),
    Architecture("qwen3", ("qwen3",), "model.layers", _LLAMA_MAPPINGS, gguf_arch="qwen3"),
    # "gemma3_text" is the text-only model (what transformers makes of a Gemma 3 GGUF file);
    # "gemma3" the image-text model, whose decoder sits under model.language_model.
    Architecture("gemma3", ("gemma3_text",), "model.layers", _GEMMA3_MAPPINGS, norm_offset=1.0,
                 gguf_arch="gemma3"),
    Architecture(
        "gemma3-vision", ("gemma3",), "model.language_model.layers", _GEMMA3_MAPPINGS,
        norm_offset=1.0, gguf_arch="gemma3",
    ),
    Architecture("phi3", ("phi3",), "model.layers", _PHI3_MAPPINGS, gguf_arch="phi3"),
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
