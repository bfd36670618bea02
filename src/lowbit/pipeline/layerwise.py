"""The sequential pipeline: one decoder layer at a time, with bounded memory.

For decoder layer i, in named steps:

1. ``load``: (lazy) read its weights and move it to the compute device;
2. ``collect``: run it on every calibration batch with hooks that gather the statistics the
   stages need (and a Hessian for the common output error whenever there is calibration data);
3. ``transform``: each transform stage returns scales per scale mapping; they are folded through
   the architecture's mappings and the statistics are divided by them;
4. ``quantize``: the recipe's quantizer turns each target's weight into a QuantizedTensor;
5. ``install``: swap in ``QuantizedLinear`` and report the layer (``install`` also serves linears
   outside the decoder layers);
6. ``propagate``: run the *quantized* layer to produce layer i + 1's inputs (as GPTQ does), then
   move the layer back to the offload device.

Only one layer's activations (one tensor per batch) are held at a time.

The common per-linear measure, ``output_error``, is ||X W^T - X Q^T||^2 / ||X W^T||^2 over all
calibration inputs X, computed from H = 2/n X^T X as tr(D H D^T) / tr(W H W^T) with D = W - Q.
After a transform, W and H are the transformed ones, whose product is the original layer's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.scheme import Scheme
from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import ConfigError, NonFiniteError
from lowbit.methods.base import LayerResult, LinearStats, Quantizer, Stage, Target, Transform, relative_output_error
from lowbit.models.arch import Architecture, ScaleMapping, decoder_layers
from lowbit.models.fold import fold_scales, skip_reason
from lowbit.nn.linear import QuantizedLinear, weights_only
from lowbit.pipeline.capture import LayerInputs, capture_layer_inputs, collect_stats, run_layer, to_device
from lowbit.pipeline.lazy import Checkpoint

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("error", "float")


@dataclass
class LayerReport:
    name: str
    scheme: str
    output_error: float | None
    """||X W^T - X Q^T||^2 / ||X W^T||^2 on the calibration inputs (None without calibration)."""
    objective: str
    """The quantizer's own objective, by name (e.g. ``relative_output_error`` for GPTQ)."""
    objective_value: float
    bits_per_weight: float
    params: int


@dataclass
class Plan:
    """What the pipeline runs: transforms, then one quantizer; the statistics they need."""

    transforms: list[Transform]
    quantizer: Quantizer
    measure_error: bool = True
    kept_float: list[dict] = field(default_factory=list)
    """Linears left in float because of non-finite values (``on_nonfinite='float'``)."""
    on_nonfinite: str = "error"

    @classmethod
    def from_stages(cls, stages: list[Stage], **kwargs) -> Plan:
        if not stages or not isinstance(stages[-1], Quantizer):
            raise ConfigError("a recipe ends with one weight quantizer (rtn, gptq, hqq, awq_clip)")
        if kwargs.get("on_nonfinite", "error") not in NONFINITE_POLICIES:
            raise ConfigError(f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}")
        return cls(list(stages[:-1]), stages[-1], **kwargs)

    @property
    def stages(self) -> list[Stage]:
        return [*self.transforms, self.quantizer]

    @property
    def needs(self) -> frozenset[str]:
        needs = frozenset().union(*(s.needs for s in self.stages))
        return needs | {"hessian"} if self.measure_error else needs

    @property
    def needs_data(self) -> bool:
        return bool(frozenset().union(*(s.needs for s in self.stages)))

    @property
    def max_input_rows(self) -> int:
        return max(s.max_input_rows for s in self.stages)


# -- the steps ---------------------------------------------------------------------------------


def load(layer: nn.Module, prefix: str, checkpoint: Checkpoint | None, dtype, device) -> None:
    if checkpoint is not None:
        checkpoint.load(layer, prefix, dtype, device)
    layer.to(device)


def collect(layer: nn.Module, targets: list[Target], plan: Plan, hidden, kwargs, total_rows: int):
    """``{local_name: LinearStats}`` over every calibration batch (empty without data)."""
    if not targets or not hidden or not plan.needs:
        return {}
    with collect_stats(layer, targets, plan.needs, total_rows, plan.max_input_rows) as stats, torch.no_grad():
        for h, kw in zip(hidden, kwargs, strict=True):
            run_layer(layer, h, kw)
    return stats


def transform(layer: nn.Module, targets: list[Target], stats: dict[str, LinearStats], plan: Plan,
              arch: Architecture, skipped: set[ScaleMapping]) -> None:
    """Apply every transform stage on every mapping whose balance linears are all targets."""
    by_name = {t.local_name: t for t in targets}
    for stage in plan.transforms:
        for mapping in arch.mappings:
            if not all(name in by_name for name in mapping.balance):
                continue
            reason = skip_reason(layer, mapping)
            if reason is not None:
                if mapping not in skipped:
                    skipped.add(mapping)
                    log.info("%s: skipping %s -> %s: %s", stage.name, mapping.smooth,
                             ", ".join(mapping.balance), reason)
                continue
            weights = [(by_name[n].module.weight.data, by_name[n].args) for n in mapping.balance]
            with torch.no_grad():
                scales = stage.scales(weights, stats[mapping.balance[0]])
            if scales is None:
                continue
            fold_scales(layer, mapping, scales, arch)
            for shared in {id(stats[n]): stats[n] for n in mapping.balance}.values():
                shared.divide(scales)


def quantize_target(plan: Plan, target: Target, stats: LinearStats | None) -> LayerResult | None:
    """The quantizer's result for ``target``; None when it stays in float (non-finite values
    with ``on_nonfinite='float'``)."""
    weight = target.module.weight.data
    problem = _nonfinite(weight, f"weight of {target.name}")
    result = None
    if problem is None:
        with torch.no_grad():
            result = plan.quantizer.quantize_target(target, stats)
        problem = _scale_problem(result.qweight, target.name)
    if problem is None:
        return result
    if plan.on_nonfinite == "error":
        raise NonFiniteError(f"{problem}; fix the checkpoint, or keep such layers in float with "
                             "--keep-nonfinite-float (on_nonfinite='float')")
    log.warning("%s: kept in float", problem)
    plan.kept_float.append({"name": target.name, "reason": problem})
    return None


def install(parent: nn.Module, target: Target, result: LayerResult, stats: LinearStats | None,
            plan: Plan) -> LayerReport:
    """Swap ``target`` (a submodule of ``parent`` named ``target.local_name``) for a
    QuantizedLinear holding ``result``; report its output error and the quantizer's objective."""
    weight = target.module.weight.data
    hessian = None if stats is None else stats.get("hessian")
    error = None
    if plan.quantizer.objective == "relative_output_error":  # GPTQ minimised it: computed already
        error = float(result.objective)
    elif hessian is not None and hessian.rows > 0:
        error = relative_output_error(weight, result.qweight.dequantize(torch.float32), hessian.hessian)
    scheme = target.scheme or Scheme(target.args)
    bias = target.module.bias.data if target.module.bias is not None else None
    parent.set_submodule(target.local_name, QuantizedLinear(
        result.qweight, bias, input_activations=scheme.input_activations,
        output_activations=scheme.output_activations,
    ))
    return LayerReport(target.name, scheme.name(), error, plan.quantizer.objective,
                       float(result.objective), result.qweight.bits_per_weight, result.qweight.numel)


def propagate(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> None:
    """Replace each batch's hidden states by the (quantized) layer's output."""
    with torch.no_grad(), weights_only(layer):
        for j, kw in enumerate(kwargs):
            hidden[j] = run_layer(layer, hidden[j], kw)


def _nonfinite(t: torch.Tensor, what: str) -> str | None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        return f"{what} has {int(bad.sum())} NaN or infinite value(s)"
    return None


def _scale_problem(q: QuantizedTensor, name: str) -> str | None:
    problem = _nonfinite(q.group_scales(), f"scales of {name}")
    if problem is not None:
        dtype = (q.super_scale if q.two_level else q.scale).dtype
        return problem + f" (the weight's range overflows {dtype})"
    if q.zero_point is not None and q.zero_point.is_floating_point():
        return _nonfinite(q.zero_point, f"zero points of {name}")
    return None


# -- the loop ----------------------------------------------------------------------------------


def quantize_layers(
    model: nn.Module,
    arch: Architecture,
    targets: dict[int, list[Target]],
    plan: Plan,
    *,
    calibration: torch.Tensor | None = None,
    batch_size: int,
    device: torch.device | str = "cpu",
    offload_device: torch.device | str = "cpu",
    checkpoint: Checkpoint | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> list[LayerReport]:
    """Quantize ``targets`` (decoder-layer index -> linears) in place, layer by layer.

    ``targets`` is consumed: each layer's entries are dropped once the layer is done, so the
    float modules they name can be freed (with lazy loading, only one layer's float weights
    are ever resident)."""
    layers = decoder_layers(model, arch)
    record = LayerInputs([], [[] for _ in layers])
    hidden: list[torch.Tensor] = []
    total_rows = 0
    if calibration is not None:
        record = capture_layer_inputs(model, arch.layers, list(calibration.split(batch_size)))
        hidden = [h.to(device) for h in record.hidden]
        total_rows = calibration.numel()
    elif plan.needs_data:
        raise ConfigError(f"{'+'.join(s.name for s in plan.stages)} needs calibration data")
    reports: list[LayerReport] = []
    skipped: set[ScaleMapping] = set()
    names = "+".join(s.name for s in plan.stages)
    bar = tqdm(range(len(layers)), desc=f"{names} layers", disable=not progress)
    for i in bar:
        layer = layers[i]
        load(layer, f"{arch.layers}.{i}.", checkpoint, dtype, device)
        layer_targets = targets.pop(i, [])
        kwargs = [to_device(k, device) for k in record.kwargs[i]] if hidden else []
        stats = collect(layer, layer_targets, plan, hidden, kwargs, total_rows)
        transform(layer, layer_targets, stats, plan, arch, skipped)
        done = []
        for t in layer_targets:
            result = quantize_target(plan, t, stats.get(t.local_name))
            if result is not None:
                done.append(install(layer, t, result, stats.get(t.local_name), plan))
        del stats
        reports.extend(done)
        if hidden and i + 1 < len(layers):
            propagate(layer, hidden, kwargs)
        layer.to(offload_device)
        if done:
            errors = [r.output_error for r in done if r.output_error is not None]
            if errors:
                bar.set_postfix(error=f"{sum(errors) / len(errors):.3g}")
            log.debug("layer %d: %s", i, {r.name: (r.output_error, r.objective_value) for r in done})
        del layer_targets
    return reports
