"""Lazy loading: a model skeleton whose weights are read from safetensors on demand.

``lazy_model(folder)`` builds the model with every parameter on the ``meta`` device (buffers
such as rotary frequencies are computed normally), then loads everything outside the decoder
layers. ``Checkpoint.load(module, prefix)`` fills one decoder layer when the pipeline reaches it;
reads are memory-mapped, so only that layer's tensors are resident.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lowbit.errors import ModelLoadError


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or an index of shards), by name."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        else:
            single = self.folder / "model.safetensors"
            if not single.exists():
                raise ModelLoadError(
                    f"{self.folder} has no model.safetensors (or index): lazy loading needs "
                    "safetensors weights; convert the checkpoint with save_pretrained"
                )
            with safe_open(single, "pt") as f:
                self.files = {name: single for name in f.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    chunk_bytes = 64 << 20

    def get(self, name: str) -> torch.Tensor:
        """A copy of the stored tensor: nothing keeps the file mapped once it is dropped.

        Large tensors are copied in row chunks of about ``chunk_bytes``, each from its own
        mapping: pages of a mapped file count as resident while mapped, so copying a tensor in
        one piece would briefly hold it twice (Gemma-3's 671 MB embedding: +1.34 GB)."""
        file = self.files[name]
        with safe_open(file, "pt") as f:
            view = f.get_slice(name)
            shape = view.get_shape()
            first = view[0:1] if len(shape) > 0 and shape[0] > 1 else None
            row_bytes = first.numel() * first.element_size() if first is not None else 0
            if first is None or row_bytes * shape[0] <= self.chunk_bytes:
                return f.get_tensor(name).clone()
        out = torch.empty(shape, dtype=first.dtype)
        rows = max(1, self.chunk_bytes // max(1, row_bytes))
        for start in range(0, shape[0], rows):
            with safe_open(file, "pt") as f:
                out[start:start + rows] = f.get_slice(name)[start:start + rows]
        return out

    def load(self, module: nn.Module, prefix: str, dtype: torch.dtype | None, device="cpu",
             skip: frozenset[str] = frozenset()) -> None:
        """Replace the meta parameters of ``module`` by the checkpoint's ``prefix + name``
        (``dtype`` None keeps the stored dtype; names in ``skip`` are left alone)."""
        for name, param in list(module.named_parameters(recurse=True, remove_duplicate=False)):
            if not param.is_meta or prefix + name in skip:
                continue
            key = prefix + name
            if key not in self.files:
                raise ModelLoadError(f"checkpoint {self.folder} has no tensor {key}")
            value = self.get(key).to(device=device, dtype=dtype)
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def lazy_model(folder: str | Path, layers_path: str, dtype: torch.dtype = torch.float32):
    """The model at ``folder`` with only its non-layer weights loaded; returns (model, checkpoint)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = Checkpoint(folder)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    layers = model.get_submodule(layers_path)
    for name, module in model.named_children():
        _load_outside(module, name + ".", layers, checkpoint, dtype)
    tie_embeddings(model)
    missing = [
        n for n, p in model.named_parameters() if p.is_meta and not n.startswith(layers_path + ".")
    ]
    if missing:
        raise ModelLoadError(f"checkpoint {folder} lacks weights for {', '.join(missing[:5])}")
    return model, checkpoint


def _load_outside(module, prefix, layers, checkpoint, dtype):
    if module is layers:
        return
    for name, param in list(module.named_parameters(recurse=False)):
        key = prefix + name
        if param.is_meta and key in checkpoint:
            module._parameters[name] = nn.Parameter(
                checkpoint.get(key).to(dtype), requires_grad=False
            )
    for name, child in module.named_children():
        _load_outside(child, prefix + name + ".", layers, checkpoint, dtype)


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """Tied weights as {target: source} (``lm_head.weight`` -> the input embedding), if tied."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not isinstance(tied, dict):  # older transformers: a list of targets
        embedding = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
        tied = {k: embedding for k in tied}
    return dict(tied)


def tie_embeddings(model: nn.Module) -> None:
    """Point each tied target parameter at its source."""
    for target, source in tied_parameters(model).items():
        owner_name, _, leaf = target.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._parameters[leaf] = model.get_parameter(source)
