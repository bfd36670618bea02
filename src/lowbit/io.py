"""lowbit's native checkpoint: a Hugging Face folder whose quantized linears are stored packed.

    config.json         the model config plus ``quantization_config``:
                        {"quant_method": "lowbit", "version": 2, "recipe": {...},
                         "layers": {name: {format, block_size, shape, dtype, zero_point,
                                           [input_activations], [output_activations]}}}
                        (activation settings are QuantArgs dicts; version 1 had none)
    model.safetensors   float tensors as in the model, and for each quantized linear NAME:
                        NAME.qdata (uint8 packed codes), NAME.scale, NAME.zero_point (packed
                        when integer), NAME.group_index (int32, optional), NAME.bias
    tokenizer files, generation_config.json, lowbit_report.json (how it was made)

``quantization_config.files`` records the size and SHA-256 of every safetensors file, so that
``load`` refuses a truncated, corrupted or swapped file instead of computing with it.

Writes are atomic: everything goes to a hidden temporary folder beside the target, which is
renamed into place only when complete (``lowbit.outputs``: what may be replaced, and how an
interrupted write is cleaned up).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.core.args import QuantArgs
from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import ConfigError, ModelLoadError, OutputError
from lowbit.nn.linear import ACTIVATION_FIELDS, QuantizedLinear
from lowbit.outputs import (
    PARTIAL_MARKER,
    check_output,
    describe_os_error,
    fsync_files,
    replace_folder,
    sweep_stale,
    temp_folder,
)

FORMAT_NAME = "lowbit"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_SHARD_BYTES = 4 * 1024**3


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantization_config(model: nn.Module, recipe=None) -> dict:
    return {
        "quant_method": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "recipe": None if recipe is None else recipe.to_dict(),
        "layers": {n: m.metadata() for n, m in quantized_layers(model).items()},
    }


def save(model: nn.Module, out: str | Path, tokenizer=None, recipe=None, report: dict | None = None,
         overwrite: bool = False) -> Path:
    """Save a quantized model to ``out`` atomically; returns the final path.

    overwrite: replace an existing ``out`` that is empty or a lowbit output holding only what
    lowbit writes; anything else is refused (``lowbit.outputs.check_output``). A failed write
    (full or read-only file system, an interrupt) leaves ``out`` as it was and raises
    OutputError (KeyboardInterrupt as itself)."""
    out = check_output(out, overwrite=overwrite)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out.parent)
        tmp = temp_folder(out.parent, out.name)
        _write(model, tmp, tokenizer, recipe, report)
        (tmp / PARTIAL_MARKER).unlink()
        replace_folder(tmp, out)
    except OSError as err:
        raise OutputError(f"cannot write output {out}: {describe_os_error(err, out.parent)}") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(model, folder: Path, tokenizer, recipe, report) -> None:
    write_safetensors(folder, _unique_state(model))
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model, recipe)
    config["quantization_config"]["files"] = {
        f.name: file_digest(f) for f in sorted(folder.glob("*.safetensors"))
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if report is not None:
        (folder / "lowbit_report.json").write_text(json.dumps(report, indent=2))
    fsync_files(folder)


def file_digest(file: Path) -> dict:
    """``{"bytes": size, "sha256": hex}`` of a file, as recorded in ``quantization_config.files``."""
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
    return {"bytes": file.stat().st_size, "sha256": h.hexdigest()}


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


def write_safetensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``model.safetensors``, or shards of at most MAX_SHARD_BYTES with the index transformers
    reads (``model.safetensors.index.json``)."""
    shards = _shards(tensors)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


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


def read_quantization_config(folder: str | Path) -> dict:
    folder = Path(folder)
    config_file = folder / "config.json"
    if not folder.exists():
        raise ModelLoadError(f"{folder} does not exist")
    if not config_file.exists():
        raise ModelLoadError(f"{folder} has no config.json: it is not a model folder")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelLoadError(f"cannot read {config_file}: {_first_line(err)}") from None
    qc = (config.get("quantization_config") if isinstance(config, dict) else None) or {}
    if not isinstance(qc, dict) or qc.get("quant_method") != FORMAT_NAME:
        raise ModelLoadError(
            f"{folder} is not a lowbit-quantized model (no lowbit quantization_config); "
            "quantize it first with `lowbit quantize`"
        )
    if qc.get("version") not in READABLE_VERSIONS:
        raise ModelLoadError(
            f"{folder} uses lowbit format version {qc.get('version')}; this lowbit reads {FORMAT_VERSION}"
        )
    if not isinstance(qc.get("layers"), dict) or not isinstance(qc.get("files", {}), dict):
        raise ModelLoadError(f"{config_file} is corrupt: its quantization_config has no layer table")
    return qc


def verify_files(folder: str | Path, qc: dict, digests: bool = True) -> None:
    """Refuse safetensors files whose size or (``digests``) SHA-256 differ from what ``save``
    recorded (checkpoints written before lowbit recorded them are not checked)."""
    folder = Path(folder)
    for name, expected in qc.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise ModelLoadError(f"{folder} lacks {name}, which lowbit wrote there: its weights are "
                                 "missing; restore the file or quantize again")
        if not isinstance(expected, dict):
            continue
        size = file.stat().st_size
        if size != expected.get("bytes", size):
            raise ModelLoadError(f"{file} has {size} bytes, lowbit wrote {expected['bytes']}: it is "
                                 "truncated or was replaced; restore it or quantize again")
        if digests and expected.get("sha256") and file_digest(file)["sha256"] != expected["sha256"]:
            raise ModelLoadError(f"{file} is not the file lowbit wrote (its SHA-256 differs): it is "
                                 "corrupt or was changed; restore it or quantize again")


def load(folder: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = True):
    """Load a lowbit checkpoint; returns (model, tokenizer or None).

    Everything is checked while reading: the recorded file sizes and digests, the safetensors
    headers, every tensor's dtype and shape against the config, and that no floating-point
    tensor holds NaN or Inf; each problem raises a one-line ModelLoadError (or NonFiniteError)
    naming the file or tensor."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.load import has_tokenizer
    from lowbit.pipeline.lazy import Checkpoint, tie_embeddings, tied_parameters

    folder = Path(folder)
    qc = read_quantization_config(folder)
    if with_tokenizer and not has_tokenizer(folder):
        raise ModelLoadError(f"{folder} has no tokenizer files; copy them from the original model "
                             "(tokenizer.save_pretrained(folder)) or quantize again")
    verify_files(folder, qc)
    checkpoint = Checkpoint(folder, check_finite=True)
    config = _guarded(folder, lambda: AutoConfig.from_pretrained(folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    layer_meta = qc["layers"]
    dtype = _stored_float_dtype(checkpoint, layer_meta)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, meta in layer_meta.items():
        model.set_submodule(name, _quantized_layer(folder, checkpoint, model, name, meta))
    checkpoint.load(model, "", dtype=None, skip=frozenset(tied_parameters(model)))
    tie_embeddings(model)
    model.eval().to(device)
    tokenizer = _guarded(folder, lambda: AutoTokenizer.from_pretrained(folder)) if with_tokenizer else None
    return model, tokenizer


def _quantized_layer(folder: Path, checkpoint, model: nn.Module, name: str, meta) -> QuantizedLinear:
    """The QuantizedLinear ``name`` from its config entry ``meta`` and its stored tensors, after
    checking that they agree with each other and with the model."""
    from lowbit.core.blocks import grid_shape
    from lowbit.core.formats import get_format
    from lowbit.core.packing import packed_length
    from lowbit.core.tensor import DTYPES

    def bad(why: str) -> ModelLoadError:
        return ModelLoadError(f"{folder}: quantized layer {name} {why}; the checkpoint is corrupt, "
                              "quantize again")

    try:
        fmt = get_format(meta["format"])
        shape, block = tuple(meta["shape"]), tuple(meta["block_size"])
        if len(shape) != 2 or len(block) != 2 or not all(type(v) is int and v > 0 for v in shape + block):
            raise ValueError(f"shape {list(shape)}, block size {list(block)}")
        if meta["dtype"] not in DTYPES or meta["zero_point"] not in (None, "int", "float", "minimum"):
            raise ValueError(f"dtype {meta['dtype']!r}, zero point {meta['zero_point']!r}")
        acts = {k: QuantArgs.from_dict(meta[k]) for k in ACTIVATION_FIELDS if meta.get(k)}
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise bad(f"has an invalid entry in config.json ({_first_line(err)})") from None
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise bad("is not a module of this model's architecture") from None
    weight = getattr(linear, "weight", None)
    if not isinstance(linear, nn.Linear) or tuple(weight.shape) != shape:
        raise bad(f"has shape {list(shape)}, the model's layer {list(getattr(weight, 'shape', []))}")
    parts = {k: f"{name}.{k}" for k in QuantizedTensor.STORED_FIELDS if f"{name}.{k}" in checkpoint}
    entries = {k: checkpoint.entries[key] for k, key in parts.items()}
    missing = [k for k in ("qdata", "scale") + (("zero_point",) if meta["zero_point"] else ()) if k not in parts]
    if missing:
        raise bad(f"lacks its stored {', '.join(missing)}")
    grid = grid_shape(shape, block)
    expected = {"qdata": ("U8", shape[:-1] + (packed_length(shape[-1], fmt.bits),))}
    if meta.get("super_block"):
        return _two_level_layer(folder, checkpoint, linear, name, meta, parts, entries, grid, expected, acts, bad)
    if "group_index" not in parts:
        expected["scale"] = (None, grid)
    else:
        expected["group_index"] = ("I32", (shape[-1],))
    scale = entries["scale"]
    if meta["zero_point"] == "int":
        expected["zero_point"] = ("U8", scale.shape[:-1] + (packed_length(scale.shape[-1], fmt.bits),))
    elif meta["zero_point"] == "float":
        expected["zero_point"] = (None, scale.shape)
    for part, (dtype, part_shape) in expected.items():
        e = entries[part]
        if dtype is None and e.dtype not in ("F16", "BF16", "F32") or dtype not in (None, e.dtype):
            raise bad(f"stores {part} as {e.dtype}")
        if e.shape != part_shape:
            raise bad(f"stores {part} with shape {list(e.shape)}, its layout needs {list(part_shape)}")
    if scale.dtype not in ("F16", "BF16", "F32") or len(scale.shape) != 2 or scale.shape[0] != grid[0]:
        raise bad(f"stores scale as {scale.dtype} with shape {list(scale.shape)}")
    tensors = {k: checkpoint.get(key) for k, key in parts.items()}
    index = tensors.get("group_index")
    if index is not None and index.numel() and not (0 <= int(index.min()) and int(index.max()) < scale.shape[-1]):
        raise bad("has group indices outside its scales")
    bias = None
    if f"{name}.bias" in checkpoint:
        if linear.bias is None:
            raise bad("has a stored bias the model's layer lacks")
        checkpoint.check_fits(f"{name}.bias", linear.bias, None)
        bias = checkpoint.get(f"{name}.bias")
    elif linear.bias is not None:
        raise bad("lacks its stored bias")
    return QuantizedLinear(QuantizedTensor.from_tensors(tensors, meta), bias, **acts)


def _two_level_layer(folder, checkpoint, linear, name, meta, parts, entries, grid, expected, acts, bad):
    """A QuantizedLinear with two-level (k-quant) scales, after checking its stored parts."""
    from lowbit.core.formats import get_format
    from lowbit.core.packing import packed_length

    try:
        sfmt = get_format(meta["scale_format"])
        super_block = int(meta["super_block"])
        if super_block < 1 or super_block % meta["block_size"][-1]:
            raise ValueError(f"super block {super_block}")
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise bad(f"has an invalid entry in config.json ({_first_line(err)})") from None
    codes = ("U8", grid[:-1] + (packed_length(grid[-1], sfmt.bits),))
    supers = ("F16", (grid[0], -(-meta["shape"][-1] // super_block)))
    expected.update(scale=codes, super_scale=supers)
    if meta["zero_point"] == "minimum":
        expected.update(zero_point=codes, super_min=supers)
    for part, (dtype, part_shape) in expected.items():
        if part not in entries:
            raise bad(f"lacks its stored {part}")
        e = entries[part]
        if e.dtype != dtype or tuple(e.shape) != tuple(part_shape):
            raise bad(f"stores {part} as {e.dtype} {list(e.shape)}, its layout needs {dtype} {list(part_shape)}")
    tensors = {k: checkpoint.get(key) for k, key in parts.items()}
    bias = None
    if f"{name}.bias" in checkpoint:
        bias = checkpoint.get(f"{name}.bias")
    return QuantizedLinear(QuantizedTensor.from_tensors(tensors, meta), bias, **acts)


def _stored_float_dtype(checkpoint, layer_meta: dict) -> torch.dtype:
    """The dtype of the float tensors outside the quantized layers (the most common one: a
    tensor stored otherwise is refused when it is loaded)."""
    from collections import Counter

    parts = {f"{n}.{k}" for n in layer_meta for k in (*QuantizedTensor.STORED_FIELDS, "bias")}
    counts = Counter(e.dtype for n, e in checkpoint.entries.items() if n not in parts)
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for dtype, _ in counts.most_common():
        if dtype in names:
            return names[dtype]
    return torch.float32


def _guarded(folder: Path, load):
    """Run a transformers reader on ``folder``; its errors become one-line ModelLoadErrors."""
    try:
        return load()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelLoadError(f"cannot load {folder}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
