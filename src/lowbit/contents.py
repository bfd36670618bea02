"""What a saved lowbit model holds, read from its config and safetensors headers (no weights
are loaded): per-layer formats, block sizes, parameters, stored bytes and bits per weight."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import safe_open

from lowbit.io import read_quantization_config

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_PARTS = ("qdata", "scale", "zero_point", "group_index")


@dataclass
class LayerInfo:
    name: str
    format: str
    block_size: list[int]
    zero_point: str | None
    shape: list[int]
    params: int
    bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params


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
                {**asdict(layer), "bits_per_weight": round(layer.bits_per_weight, 4)}
                for layer in self.layers
            ],
        }


def tensor_bytes(folder: Path) -> dict[str, int]:
    """Stored bytes of every tensor in the folder's safetensors files."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                out[key] = math.prod(s.get_shape()) * _DTYPE_BYTES[s.get_dtype()]
    return out


def inspect_folder(folder: str | Path) -> ModelInfo:
    folder = Path(folder)
    qc = read_quantization_config(folder)
    sizes = tensor_bytes(folder)
    layers = []
    for name, meta in qc["layers"].items():
        nbytes = sum(sizes.pop(f"{name}.{p}", 0) for p in _PARTS)
        layers.append(LayerInfo(name, meta["format"], meta["block_size"], meta["zero_point"],
                                meta["shape"], math.prod(meta["shape"]), nbytes))
    return ModelInfo(str(folder), layers, sum(sizes.values()), qc.get("recipe"))
