"""The verb: ``quantize(model, recipe, calibration)``.

Quantizes a loaded model in place (its ``nn.Linear`` layers become ``QuantizedLinear``), layer
by layer, running the recipe's stages (``lowbit.pipeline.layerwise``). ``quantize_pretrained``
does the same from a model spec, optionally loading weights lazily so that only one decoder
layer is in float precision at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.defaults import BATCH_SIZE
from lowbit.errors import ConfigError
from lowbit.methods.base import Target
from lowbit.models.arch import Architecture, get_architecture
from lowbit.pipeline.layerwise import LayerReport, Plan, install, quantize_layers, quantize_target
from lowbit.pipeline.lazy import Checkpoint
from lowbit.recipe import Recipe


@dataclass
class QuantizeReport:
    recipe: Recipe
    layers: list[LayerReport]
    seconds: float
    calibration: dict | None = None
    kept_float: list[dict] = field(default_factory=list)
    """Linears left in float because of non-finite values, with the reason."""
    extra: dict = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        """Over the quantized linear layers, scales and zero points included."""
        total = sum(r.params for r in self.layers)
        return sum(r.bits_per_weight * r.params for r in self.layers) / max(1, total)

    @property
    def mean_output_error(self) -> float | None:
        """Mean over linears of the relative output error (None without calibration)."""
        errors = [r.output_error for r in self.layers if r.output_error is not None]
        return sum(errors) / len(errors) if errors else None

    def to_dict(self) -> dict:
        mean = self.mean_output_error
        return {
            "recipe": self.recipe.to_dict(),
            "seconds": round(self.seconds, 3),
            "bits_per_weight": round(self.bits_per_weight, 4),
            "mean_output_error": None if mean is None else round(mean, 6),
            "calibration": self.calibration,
            "kept_float": list(self.kept_float),
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
        scheme = recipe.scheme_for(name)
        if scheme is None:
            continue
        if name.startswith(prefix):
            index, _, local = name[len(prefix):].partition(".")
            inside.setdefault(int(index), []).append(Target(name, local, module, scheme.weights, scheme))
        else:
            outside.append(Target(name, name, module, scheme.weights, scheme))
    return inside, outside


def quantize(
    model: nn.Module,
    recipe: Recipe,
    calibration: torch.Tensor | None = None,
    *,
    batch_size: int = BATCH_SIZE,
    device: str | torch.device | None = None,
    checkpoint: Checkpoint | None = None,
    on_nonfinite: str = "error",
    progress: bool = True,
) -> QuantizeReport:
    """Quantize ``model`` in place following ``recipe``.

    calibration: token ids ``(samples, seq_len)``: needed by GPTQ and AWQ; with data-free methods
    it is used only to measure each linear's output error.
    device: where each layer is computed (default: where the model is); layers return to the
    model's device afterwards.
    checkpoint: for a lazily loaded model (``lowbit.pipeline.lazy.lazy_model``).
    on_nonfinite: ``"error"`` refuses a NaN/inf weight or scale, naming the tensor; ``"float"``
    keeps that linear in float and lists it in ``QuantizeReport.kept_float``.
    """
    arch = get_architecture(model)
    if recipe.file_type is not None:
        recipe = _file_type_plan(model, arch, recipe)
    plan = Plan.from_stages(recipe.build_stages(), measure_error=calibration is not None,
                            on_nonfinite=on_nonfinite)
    if plan.needs_data and calibration is None:
        raise ConfigError(
            f"method {recipe.method} needs calibration data: pass calibration token ids "
            "(see lowbit.data.calibration_tokens)"
        )
    inside, outside = select_targets(model, arch, recipe)
    if not inside and not outside:
        raise ConfigError(
            "no linear layer matches the recipe (targets "
            f"{list(recipe.targets)}, ignore {list(recipe.ignore)}); check the patterns"
        )
    if outside and plan.needs_data:
        names = ", ".join(t.name for t in outside)
        raise ConfigError(
            f"{names} lies outside the decoder layers, where {recipe.method} has no calibration "
            "inputs; add it to ignore or quantize it with rtn or hqq"
        )
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    start = time.perf_counter()
    reports = quantize_layers(
        model, arch, inside, plan, calibration=calibration, batch_size=batch_size,
        device=device, offload_device=home, checkpoint=checkpoint,
        dtype=_float_dtype(model), progress=progress,
    )
    for t in outside:
        result = quantize_target(plan, t, None)
        if result is not None:
            reports.append(install(model, t, result, None, plan))
    return QuantizeReport(recipe, reports, time.perf_counter() - start, kept_float=plan.kept_float)


def _file_type_plan(model: nn.Module, arch: Architecture, recipe: Recipe) -> Recipe:
    if arch.gguf_arch is None:
        raise ConfigError(f"--scheme gguf:{recipe.file_type}: lowbit has no GGUF mapping for {arch.name}")
    from lowbit.models.arch import decoder_layers

    n_layers = len(decoder_layers(model, arch))
    linears = {n: (-1, *m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return recipe.with_file_type_plan(linears, arch.gguf_arch, n_layers)


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
    batch_size: int = BATCH_SIZE,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    on_nonfinite: str = "error",
    progress: bool = True,
):
    """Load ``model_spec`` (bundled name, folder, GGUF file or hub id) and quantize it.

    calibration: a ``lowbit.data.CalibrationSpec``, or None (data-free methods only). Data-free
    methods given one use it to measure each linear's output error.
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
    tokens = None if calibration is None else calibration_tokens(calibration, tokenizer)
    report = quantize(
        model, recipe, tokens, batch_size=batch_size, device=device, checkpoint=checkpoint,
        on_nonfinite=on_nonfinite, progress=progress,
    )
    if tokens is not None:
        report.calibration = calibration.to_dict()
    report.extra["model"] = source.name
    report.extra["model_spec"] = str(model_spec)
    return model, tokenizer, report
