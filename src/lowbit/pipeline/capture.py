"""Capturing what decoder layers receive, and the statistics methods ask for.

``capture_layer_inputs`` runs the model's embedding stage once per calibration batch with every
decoder layer swapped for a recorder that returns its input unchanged. It keeps layer 0's input
hidden states and the keyword arguments (masks, position embeddings) each layer receives, so
each layer can later be run on its own. The layers are restored in a ``finally`` block.

``collect_stats`` registers forward hooks on target linears inside a context manager that
always removes them. Linears that read the same input tensor share one ``LinearStats``, holding
the statistics named in ``needs``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.methods.base import DEFAULT_INPUT_ROWS, LinearStats, Target


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class _Recorder(nn.Module):
    def __init__(self, index: int, record: LayerInputs):
        super().__init__()
        self.index = index
        self.record = record

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layers are expected to take keyword arguments only")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        if self.index == 0:
            self.record.hidden.append(hidden_states.detach())
        self.record.kwargs[self.index].append(kwargs)
        return hidden_states


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # per batch: the current layer's input hidden states
    kwargs: list[list[dict]]  # [layer][batch]: keyword arguments of that layer's forward


def capture_layer_inputs(model: nn.Module, layers_path: str, batches: list[torch.Tensor]) -> LayerInputs:
    parent_path, _, attr = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layers: nn.ModuleList = getattr(parent, attr)
    originals = list(layers)
    record = LayerInputs([], [[] for _ in originals])
    device = next(p for p in parent.parameters() if not p.is_meta).device
    try:
        for i in range(len(layers)):
            layers[i] = _Recorder(i, record)
        with torch.inference_mode():
            for batch in batches:
                parent(input_ids=batch.to(device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return record


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def collect_stats(layer: nn.Module, targets: list[Target], needs, total_rows: int,
                  max_rows: int = DEFAULT_INPUT_ROWS):
    """Yields ``{local_name: LinearStats}``, filled while the layer runs forward inside the
    block. ``needs``: statistic names; ``total_rows``: input rows the block will see in all;
    ``max_rows``: rows an input sample keeps."""
    stats: dict[str, LinearStats] = {}
    leader: dict[str, bool] = {}
    # Inputs seen in the current forward, by identity. Holding the tensors keeps their memory
    # from being reused by a later input of the same shape within that forward, which would
    # otherwise group unrelated linears (e.g. q_proj with gate_proj) by a recycled address.
    seen: dict[int, tuple[torch.Tensor, str]] = {}

    def reset(*_):
        seen.clear()

    def hook_for(target: Target):
        def hook(module, inputs, output):
            x = inputs[0]
            name = target.local_name
            if name not in stats:  # first batch: group linears that read the same tensor
                if id(x) in seen:
                    stats[name] = stats[seen[id(x)][1]]
                    leader[name] = False
                else:
                    stats[name] = LinearStats.new(needs, x.shape[-1], total_rows, max_rows, x.device)
                    leader[name] = True
            seen.setdefault(id(x), (x, name))
            if leader[name]:
                stats[name].add(x.detach())

        return hook

    handles = [layer.register_forward_pre_hook(reset)]
    try:
        for target in targets:
            handles.append(target.module.register_forward_hook(hook_for(target)))
        yield stats
    finally:
        for h in handles:
            h.remove()
