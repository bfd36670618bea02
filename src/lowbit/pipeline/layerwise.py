"""The sequential pipeline: one decoder layer at a time, with bounded memory.

For layer i: (lazy) load its weights and move it to the compute device; if the method needs
statistics, run the layer on every calibration batch with hooks that collect them; quantize its
target linears; swap in ``QuantizedLinear`` modules; run the *quantized* layer to produce the
inputs of layer i + 1 (as GPTQ does); move the layer back to the offload device. Only one
layer's activations (one tensor per batch) are held at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.methods.base import Method, Target
from lowbit.models.arch import Architecture, decoder_layers
from lowbit.nn.linear import QuantizedLinear
from lowbit.pipeline.capture import capture_layer_inputs, collect_stats, run_layer, to_device
from lowbit.pipeline.lazy import Checkpoint

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    scheme: str
    loss: float
    bits_per_weight: float
    params: int


def quantize_layers(
    model: nn.Module,
    arch: Architecture,
    targets: dict[int, list[Target]],
    method: Method,
    *,
    calibration: torch.Tensor | None = None,
    batch_size: int = 8,
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
    needs_data = method.needs != "none"
    hidden: list[torch.Tensor] = []
    record = None
    total_rows = 0
    if needs_data:
        batches = list(calibration.split(batch_size))
        record = capture_layer_inputs(model, arch.layers, batches)
        hidden = [h.to(device) for h in record.hidden]
        total_rows = calibration.numel()
    reports: list[LayerReport] = []
    bar = tqdm(range(len(layers)), desc=f"{method.name} layers", disable=not progress)
    for i in bar:
        layer = layers[i]
        if checkpoint is not None:
            checkpoint.load(layer, f"{arch.layers}.{i}.", dtype, device)
        layer.to(device)
        layer_targets = targets.pop(i, [])
        kwargs = [to_device(k, device) for k in record.kwargs[i]] if needs_data else []
        stats: dict = {}
        if needs_data and layer_targets:
            with collect_stats(layer, layer_targets, method, total_rows) as stats, torch.no_grad():
                for h, kw in zip(hidden, kwargs):
                    run_layer(layer, h, kw)
        with torch.no_grad():
            results = method.quantize_layer(layer, layer_targets, stats, arch)
        del stats
        for t in layer_targets:
            result = results[t.local_name]
            bias = t.module.bias.data if t.module.bias is not None else None
            layer.set_submodule(t.local_name, QuantizedLinear(result.qweight, bias))
            reports.append(
                LayerReport(t.name, t.args.name(), result.loss, result.qweight.bits_per_weight,
                            result.qweight.numel)
            )
        if needs_data and i + 1 < len(layers):
            with torch.no_grad():
                for j, kw in enumerate(kwargs):
                    hidden[j] = run_layer(layer, hidden[j], kw)
        layer.to(offload_device)
        if layer_targets:
            losses = [results[t.local_name].loss for t in layer_targets]
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.3g}")
            log.debug("layer %d: %s", i, {t.local_name: results[t.local_name].loss for t in layer_targets})
        del layer_targets, results
    return reports

