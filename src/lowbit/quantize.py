"""The verb: ``quantize(model, recipe, calibration)``.

Quantizes a loaded model in place (its ``nn.Linear`` layers become ``QuantizedLinear``), layer
by layer. ``quantize_pretrained`` does the same from a model spec, optionally loading weights
lazily so that only one decoder layer is in float precision at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.methods.base import Target, get_method
from lowbit.models.arch import Architecture, get_architecture
from lowbit.nn.linear import QuantizedLinear
from lowbit.pipeline.layerwise import LayerReport, quantize_layers
from lowbit.pipeline.lazy import Checkpoint
from lowbit.recipe import Recipe


@dataclass
class QuantizeReport:
    recipe: Recipe
    layers: list[LayerReport]
    seconds: float
    calibration: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        """Over the quantized linear layers, scales and zero points included."""
        total = sum(r.params for r in self.layers)
        return sum(r.bits_per_weight * r.params for r in self.layers) / max(1, total)

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe.to_dict(),
            "seconds": round(self.seconds, 3),
            "bits_per_weight": round(self.bits_per_weight, 4),
            "calibration": self.calibration,
            "layers": [vars(r) for r in self.layers],
            **self.extra,
        }


def select_targets(
    model: nn.Module, arch: Architecture, recipe: Recipe
) -> tuple[dict[int, list[Target]], list[Target]]:
    """Linear layers the recipe selects: by decoder-layer index, and those outside the layers."""
    prefix = arch.layers + "."
    inside: dict[int, list[Target]] = {}
    outside: list[Target] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        args = recipe.scheme_for(name)
        if args is None:
            continue
        if name.startswith(prefix):
            index, _, local = name[len(prefix):].partition(".")
            inside.setdefault(int(index), []).append(Target(name, local, module, args))
        else:
            outside.append(Target(name, name, module, args))
    return inside, outside


def quantize(
    model: nn.Module,
    recipe: Recipe,
    calibration: torch.Tensor | None = None,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    checkpoint: Checkpoint | None = None,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize ``model`` in place following ``recipe``.

    calibration: token ids ``(samples, seq_len)`` for methods that need data (GPTQ, AWQ).
    device: where each layer is computed (default: where the model is); layers return to the
    model's device afterwards.
    checkpoint: for a lazily loaded model (``lowbit.pipeline.lazy.lazy_model``).
    """
    arch = get_architecture(model)
    method = get_method(recipe.method, recipe.method_options)
    if method.needs != "none" and calibration is None:
        raise ConfigError(
            f"method {method.name} needs calibration data: pass calibration token ids "
            "(see lowbit.data.calibration_tokens)"
        )
    inside, outside = select_targets(model, arch, recipe)
    if not inside and not outside:
        raise ConfigError(
            "no linear layer matches the recipe (targets "
            f"{list(recipe.targets)}, ignore {list(recipe.ignore)}); check the patterns"
        )
    if outside and method.needs != "none":
        names = ", ".join(t.name for t in outside)
        raise ConfigError(
            f"{names} lies outside the decoder layers, where {method.name} has no calibration "
            "inputs; add it to ignore or quantize it with rtn or hqq"
        )
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    start = time.perf_counter()
    reports = quantize_layers(
        model, arch, inside, method, calibration=calibration, batch_size=batch_size,
        device=device, offload_device=home, checkpoint=checkpoint,
        dtype=_float_dtype(model), progress=progress,
    )
    for t in outside:
        weight = t.module.weight.data
        result = method.quantize_weight(weight, t.args, None)
        bias = t.module.bias.data if t.module.bias is not None else None
        model.set_submodule(t.name, QuantizedLinear(result.qweight, bias))
        reports.append(LayerReport(t.name, t.args.name(), result.loss,
                                   result.qweight.bits_per_weight, result.qweight.numel))
    return QuantizeReport(recipe, reports, time.perf_counter() - start)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def quantize_pretrained(
    model_spec: str,
    recipe: Recipe,
    calibration=None,
    *,
    lazy: bool = True,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
):
    """Load ``model_spec`` (bundled name, folder, GGUF file or hub id) and quantize it.

    calibration: a ``lowbit.data.CalibrationSpec`` (or None for data-free methods).
    lazy: read decoder-layer weights from safetensors only when the pipeline reaches them.
    Returns (model, tokenizer, report). The source checkpoint is only read.
    """
    from lowbit.data.calibration import calibration_tokens
    from lowbit.models.arch import architecture_for
    from lowbit.models.load import load_model, load_tokenizer, resolve_model
    from lowbit.pipeline.lazy import lazy_model

    source = resolve_model(model_spec)
    arch = architecture_for(source.model_type)
    tokenizer = load_tokenizer(model_spec)
    checkpoint = None
    if lazy:
        model, checkpoint = lazy_model(source.folder, arch.layers, dtype)
    else:
        model, _ = load_model(model_spec, dtype=dtype)
    tokens = None
    if calibration is not None and get_method(recipe.method, recipe.method_options).needs != "none":
        tokens = calibration_tokens(calibration, tokenizer)
    report = quantize(
        model, recipe, tokens, batch_size=batch_size, device=device, checkpoint=checkpoint,
        progress=progress,
    )
    if tokens is not None:
        report.calibration = calibration.to_dict()
    report.extra["model"] = source.name
    return model, tokenizer, report
