"""Lazy loading: a model skeleton whose weights are read from safetensors on demand.

``lazy_model(folder)`` builds the model with every parameter on the ``meta`` device (buffers
such as rotary frequencies are computed normally), then loads everything outside the decoder
layers. ``Checkpoint.load(module, prefix)`` fills one decoder layer when the pipeline reaches it;
reads are memory-mapped, so only that layer's tensors are resident.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lowbit.errors import ModelLoadError, NonFiniteError

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
"""Bytes per element of each safetensors dtype lowbit reads."""
FLOAT_DTYPES = frozenset({"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"})
TORCH_DTYPES = {
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.bool: "BOOL",
}
MAX_HEADER_BYTES = 100 << 20
"""safetensors' own limit on the JSON header."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(file: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors and metadata of a safetensors file, after checking that the header is
    well-formed and that the data it describes fills the file exactly (as safetensors requires);
    a truncated or garbled file raises a one-line ModelLoadError naming it."""
    file = Path(file)
    fix = "re-save or re-download it"
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = fh.read(length) if length is not None and length <= min(MAX_HEADER_BYTES, size - 8) else None
    except OSError as err:
        raise ModelLoadError(f"cannot read {file}: {err.strerror or err}") from None
    if length is None:
        raise ModelLoadError(f"{file} is truncated ({size} bytes, less than a safetensors header); {fix}")
    if raw is None:
        what = "truncated" if length <= MAX_HEADER_BYTES else "corrupt"
        raise ModelLoadError(f"{file} is {what}: its header claims {length} bytes, the file has {size}; {fix}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ModelLoadError(f"{file} is corrupt: its header is not valid JSON; {fix}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file} is corrupt: its header is not a JSON object; {fix}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelLoadError(f"{file} is corrupt: its __metadata__ is not a map of strings; {fix}")
    entries = {name: _entry(file, name, info, fix) for name, info in header.items()}
    position = 0
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != position:
            raise ModelLoadError(f"{file} is corrupt: the data of tensor {name} does not follow the "
                                 f"previous tensor (offset {e.begin}, expected {position}); {fix}")
        position = e.end
    data = size - 8 - length
    if position != data:
        what = "truncated" if position > data else "corrupt"
        raise ModelLoadError(f"{file} is {what}: its header describes {position} bytes of data, the "
                             f"file holds {data}; {fix}")
    return entries, metadata


def _entry(file: Path, name: str, info, fix: str) -> TensorEntry:
    def bad(why: str) -> ModelLoadError:
        return ModelLoadError(f"{file} is corrupt: tensor {name} {why}; {fix}")

    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad("is not described by dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise bad(f"has dtype {dtype!r}, which lowbit does not read")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise bad(f"has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has invalid data offsets {offsets!r}")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise bad(f"({dtype}, shape {shape}) does not match its {offsets[1] - offsets[0]} bytes of data")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards its index names, or
    model.safetensors; a missing file raises ModelLoadError."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(_index_map(index).values()))
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ModelLoadError(
            f"{folder} has no model.safetensors (or model.safetensors.index.json): its weights are "
            "missing; save or copy the complete checkpoint there"
        )
    return [single]


def _index_map(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelLoadError(f"{index} is not a valid safetensors index (no weight_map); "
                             "re-save the checkpoint") from None
    files = {name: index.parent / f for name, f in weight_map.items()}
    for f in sorted(set(files.values())):
        if not f.is_file() or f.parent != index.parent:
            raise ModelLoadError(f"{index} names the shard {f.name}, which is missing; "
                                 "copy the complete checkpoint")
    return files


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or an index of shards), by name.

    Every header is checked when the checkpoint is opened (``read_header``), and every tensor
    against the parameter it replaces (``load``): a truncated file, a garbled header, a tensor
    whose dtype or shape does not fit the model raise a one-line ModelLoadError naming it.
    check_finite: also refuse floating-point tensors holding NaN or Inf (NonFiniteError).
    """

    def __init__(self, folder: str | Path, check_finite: bool = False):
        self.folder = Path(folder)
        self.check_finite = check_finite
        files = weight_files(self.folder)
        headers = {f: read_header(f)[0] for f in files}
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            self.files = _index_map(index)
            for name, f in self.files.items():
                if name not in headers[f]:
                    raise ModelLoadError(f"{index} places {name} in {f.name}, which does not hold it; "
                                         "re-save the checkpoint")
        else:
            self.files = {name: files[0] for name in headers[files[0]]}
        self.entries = {name: headers[f][name] for name, f in self.files.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    chunk_bytes = 64 << 20

    def get(self, name: str) -> torch.Tensor:
        """A copy of the stored tensor: nothing keeps the file mapped once it is dropped.

        Large tensors are copied in row chunks of about ``chunk_bytes``, each from its own
        mapping: pages of a mapped file count as resident while mapped, so copying a tensor in
        one piece would briefly hold it twice (Gemma-3's 671 MB embedding: +1.34 GB)."""
        try:
            out = self._read(name)
        except (OSError, RuntimeError, ValueError, SafetensorError) as err:
            text = str(err).strip().splitlines()
            raise ModelLoadError(f"cannot read tensor {name} from {self.files[name]}: "
                                 f"{text[0] if text else type(err).__name__}") from None
        if self.check_finite:
            check_finite(out, name, self.files[name])
        return out

    def _read(self, name: str) -> torch.Tensor:
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

    def check_fits(self, name: str, param: torch.Tensor, dtype: torch.dtype | None) -> None:
        """Refuse a stored tensor that cannot be the parameter ``param``: another shape, an
        integer dtype for a float parameter, or (``dtype`` None: kept as stored) another dtype."""
        entry, file = self.entries[name], self.files[name]
        if entry.shape != tuple(param.shape):
            raise ModelLoadError(f"{file}: tensor {name} has shape {list(entry.shape)}, the model "
                                 f"expects {list(param.shape)}; the checkpoint does not fit its config")
        expected = TORCH_DTYPES.get(param.dtype)
        if param.is_floating_point() and entry.dtype not in FLOAT_DTYPES or (
            dtype is None and expected is not None and entry.dtype != expected
        ):
            raise ModelLoadError(f"{file}: tensor {name} is stored as {entry.dtype}, the model's "
                                 f"weights are {expected}; its header is wrong or the file is corrupt")

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
            self.check_fits(key, param, dtype)
            value = self.get(key).to(device=device, dtype=dtype)
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def check_float_tensors(checkpoint: Checkpoint) -> None:
    """Refuse a float checkpoint (the input of quantization) holding a tensor not stored as
    floats, or tensors stored both as F16 and BF16: both mean a header that relabels a tensor's
    dtype (or files from different checkpoints), whose values would be read as garbage."""
    seen: dict[str, str] = {}
    for name, entry in checkpoint.entries.items():
        if entry.dtype not in FLOAT_DTYPES:
            raise ModelLoadError(f"{checkpoint.files[name]}: tensor {name} is stored as {entry.dtype}, "
                                 "not as floats; its header is wrong or the file is corrupt")
        seen.setdefault(entry.dtype, name)
    if "F16" in seen and "BF16" in seen:
        raise ModelLoadError(
            f"{checkpoint.folder}: tensors are stored both as F16 ({seen['F16']}) and BF16 "
            f"({seen['BF16']}); a header relabels a dtype or the files come from different checkpoints"
        )


def check_finite(t: torch.Tensor, name: str, where: str | Path) -> None:
    """Refuse a floating-point tensor holding NaN or Inf, naming it."""
    if t.is_floating_point() and t.numel():
        bad = ~torch.isfinite(t)
        if bad.any():
            raise NonFiniteError(f"{where}: tensor {name} holds {int(bad.sum())} NaN/Inf value(s); "
                                 "the checkpoint is corrupt: re-create it from the original model")


def lazy_model(folder: str | Path, layers_path: str, dtype: torch.dtype = torch.float32,
               check_finite: bool = False):
    """The float model at ``folder`` with only its non-layer weights loaded; returns
    (model, checkpoint). Headers are checked first (``check_float_tensors``).

    check_finite: refuse tensors holding NaN or Inf as they are read (``Checkpoint``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = Checkpoint(folder, check_finite=check_finite)
    check_float_tensors(checkpoint)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        text = str(err).strip().splitlines()
        raise ModelLoadError(f"cannot read the config of {folder}: {text[0] if text else type(err).__name__}") from None
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
            checkpoint.check_fits(key, param, dtype)
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
