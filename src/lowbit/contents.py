"""What a saved lowbit model holds, read from its config and safetensors headers (no weights
are loaded): per-layer formats, block sizes, parameters, stored bytes and bits per weight."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from lowbit.core.args import QuantArgs
from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import ModelLoadError
from lowbit.io import read_quantization_config, verify_files
from lowbit.pipeline.lazy import read_header, weight_files

_PARTS = QuantizedTensor.STORED_FIELDS


@dataclass
class LayerInfo:
    name: str
    format: str
    block_size: list[int]
    zero_point: str | None
    shape: list[int]
    params: int
    bytes: int
    input_activations: dict | None = None
    output_activations: dict | None = None

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params

    def activations(self) -> str:
        """How the activations are quantized, e.g. ``in: int8 token dynamic``; '-' if not."""
        parts = [f"{side}: {QuantArgs.from_dict(args).describe()}"
                 for side, args in (("in", self.input_activations), ("out", self.output_activations))
                 if args]
        return "; ".join(parts) or "-"


@dataclass
class ModelInfo:
    folder: str
    layers: list[LayerInfo]
    other_bytes: int  # everything stored that is not a quantized layer (embeddings, norms, ...)
    recipe: dict | None

    @property
    def quantized_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def quantized_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def file_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / max(1, self.quantized_params)

    def to_dict(self) -> dict:
        return {
            "folder": self.folder,
            "file_mb": round(self.file_bytes / 1e6, 3),
            "quantized_params": self.quantized_params,
            "quantized_mb": round(self.quantized_bytes / 1e6, 3),
            "other_mb": round(self.other_bytes / 1e6, 3),
            "bits_per_weight": round(self.bits_per_weight, 4),
            "recipe": self.recipe,
            "layers": [
                {**asdict(layer), "bits_per_weight": round(layer.bits_per_weight, 4),
                 "activations": layer.activations()}
                for layer in self.layers
            ],
        }


def tensor_bytes(folder: Path) -> dict[str, int]:
    """Stored bytes of every tensor in the folder's safetensors files (checked headers: a
    missing, truncated or garbled file raises ModelLoadError)."""
    out = {}
    for file in weight_files(folder):
        entries, _ = read_header(file)
        out.update({name: e.end - e.begin for name, e in entries.items()})
    return out


def inspect_folder(folder: str | Path) -> ModelInfo:
    folder = Path(folder)
    qc = read_quantization_config(folder)
    verify_files(folder, qc, digests=False)
    sizes = tensor_bytes(folder)
    layers = []
    for name, meta in qc["layers"].items():
        if f"{name}.qdata" not in sizes or f"{name}.scale" not in sizes:
            raise ModelLoadError(f"{folder}: quantized layer {name} has no stored codes or scales; "
                                 "the checkpoint is incomplete: quantize again")
        nbytes = sum(sizes.pop(f"{name}.{p}", 0) for p in _PARTS)
        try:
            layers.append(LayerInfo(name, meta["format"], meta["block_size"], meta["zero_point"],
                                    meta["shape"], math.prod(meta["shape"]), nbytes,
                                    meta.get("input_activations"), meta.get("output_activations")))
        except (KeyError, TypeError):
            raise ModelLoadError(f"{folder}/config.json describes layer {name} badly; the file is "
                                 "corrupt: quantize again") from None
    return ModelInfo(str(folder), layers, sum(sizes.values()), qc.get("recipe"))


def gguf_linear_bits(path: str | Path) -> float:
    """Bits per weight of a GGUF file's decoder-layer matrices (``blk.*`` tensors of 2 or more
    dimensions) as stored, from its header."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise ModelLoadError(f"cannot read GGUF file {path}: {err}") from None
    nbytes = numel = 0
    for t in reader.tensors:
        if t.name.startswith("blk.") and len(t.shape) >= 2:
            nbytes += int(t.n_bytes)
            numel += int(t.n_elements)
    return 8.0 * nbytes / numel if numel else math.nan
