"""lowbit's native checkpoint: a Hugging Face folder whose quantized linears are stored packed.

    config.json         the model config plus ``quantization_config``:
                        {"quant_method": "lowbit", "version": 1, "recipe": {...},
                         "layers": {name: {format, block_size, shape, dtype, zero_point}}}
    model.safetensors   float tensors as in the model, and for each quantized linear NAME:
                        NAME.qdata (uint8 packed codes), NAME.scale, NAME.zero_point (packed
                        when integer), NAME.group_index (int32, optional), NAME.bias
    tokenizer files, generation_config.json, lowbit_report.json (how it was made)

Writes are atomic: everything goes to a hidden temporary folder beside the target, which is
renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import LowbitError, ModelLoadError
from lowbit.nn.linear import QuantizedLinear

FORMAT_NAME = "lowbit"
FORMAT_VERSION = 1
MAX_SHARD_BYTES = 4 * 1024**3


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantization_config(model: nn.Module, recipe=None) -> dict:
    return {
        "quant_method": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "recipe": None if recipe is None else recipe.to_dict(),
        "layers": {n: m.qweight.metadata() for n, m in quantized_layers(model).items()},
    }


def save(model: nn.Module, out: str | Path, tokenizer=None, recipe=None, report: dict | None = None,
         overwrite: bool = False) -> Path:
    """Save a quantized model to ``out`` atomically; returns the final path."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise LowbitError(f"output {out} already exists; choose another path or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(model, tmp, tokenizer, recipe, report)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(model, folder: Path, tokenizer, recipe, report) -> None:
    tensors = _unique_state(model)
    shards = _shards(tensors)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model, recipe)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if report is not None:
        (folder / "lowbit_report.json").write_text(json.dumps(report, indent=2))
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors to store: quantized linears in their stored form (``QuantizedTensor.tensors``),
    everything else as in the state dict, without tied duplicates (safetensors refuses shared
    storage)."""
    state = model.state_dict()
    for name, module in quantized_layers(model).items():
        for key in ("qdata", "scale", "zero_point", "group_index"):
            state.pop(f"{name}.{key}", None)
        state.update({f"{name}.{k}": v for k, v in module.qweight.tensors().items()})
    out, seen = {}, set()
    for name, t in state.items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def _shards(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    return shards


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def read_quantization_config(folder: str | Path) -> dict:
    folder = Path(folder)
    config_file = folder / "config.json"
    if not folder.exists():
        raise ModelLoadError(f"{folder} does not exist")
    if not config_file.exists():
        raise ModelLoadError(f"{folder} has no config.json: it is not a model folder")
    qc = json.loads(config_file.read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != FORMAT_NAME:
        raise ModelLoadError(
            f"{folder} is not a lowbit-quantized model (no lowbit quantization_config); "
            "quantize it first with `lowbit quantize`"
        )
    if qc.get("version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"{folder} uses lowbit format version {qc.get('version')}; this lowbit reads {FORMAT_VERSION}"
        )
    return qc


def load(folder: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = True):
    """Load a lowbit checkpoint; returns (model, tokenizer or None)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lowbit.pipeline.lazy import Checkpoint, tie_embeddings, tied_parameters

    folder = Path(folder)
    qc = read_quantization_config(folder)
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    layer_meta = qc["layers"]
    dtype = _stored_float_dtype(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    checkpoint = Checkpoint(folder)
    for name, meta in layer_meta.items():
        keys = ("qdata", "scale", "zero_point", "group_index")
        tensors = {k: checkpoint.get(f"{name}.{k}") for k in keys if f"{name}.{k}" in checkpoint}
        bias = checkpoint.get(f"{name}.bias") if f"{name}.bias" in checkpoint else None
        module = QuantizedLinear(QuantizedTensor.from_tensors(tensors, meta), bias)
        model.set_submodule(name, module)
    checkpoint.load(model, "", dtype=None, skip=frozenset(tied_parameters(model)))
    tie_embeddings(model)
    model.eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder) if with_tokenizer else None
    return model, tokenizer


def _stored_float_dtype(folder: Path) -> torch.dtype:
    from safetensors import safe_open

    ckpt = next(iter(sorted(folder.glob("*.safetensors"))))
    with safe_open(ckpt, "pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            dt = t.get_dtype()
            if dt in ("F32", "F16", "BF16") and not key.endswith((".scale", ".zero_point")):
                return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dt]
    return torch.float32
