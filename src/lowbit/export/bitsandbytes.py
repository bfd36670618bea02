"""bitsandbytes: the checkpoints transformers saves and loads with ``BitsAndBytesConfig`` (NF4
4-bit and LLM.int8), written from lowbit's NF4 and int8 weights, and read back into lowbit.

The layout, as bitsandbytes 0.50 defines it (``functional.py``: ``QuantState.as_dict`` /
``from_dict``, ``get_4bit_type``; ``backends/default/ops.py``: ``quantize_4bit`` /
``dequantize_4bit``; ``nn/modules.py``: ``Linear8bitLt._save_to_state_dict``) and transformers 5
reads it (``quantizers/quantizer_bnb_4bit.py``: ``serialized_names``;
``integrations/bitsandbytes.py``; ``utils/quantization_config.py``: ``BitsAndBytesConfig``).

4-bit, for a linear NAME with weight (N, K), flattened row-major into codes c0, c1, ...:

    NAME.weight                                 uint8 (ceil(N*K/2), 1): byte i = c[2i] << 4 | c[2i+1]
                                                (first code in the HIGH nibble; lowbit's canonical
                                                packing puts it in the low one: ``pack_4bit``)
    NAME.weight.absmax                          float32, one per run of ``blocksize`` flattened values
    NAME.weight.quant_map                       float32 (16,), the level table
    NAME.weight.quant_state.bitsandbytes__nf4   uint8, UTF-8 JSON {"quant_type", "blocksize",
                                                "dtype", "shape"}
    value = table[code] * absmax[flat_index // blocksize]

bitsandbytes' readers ignore the stored ``quant_map``: they take the table of ``quant_type``.
lowbit's ``NF4_LEVELS`` equal bitsandbytes' NF4 table bit for bit, and lowbit's NF4 scale is the
block's absmax, so a lowbit NF4 block of ``g`` columns is a bitsandbytes block when ``K % g == 0``
(blocks then never straddle rows); the float16 scale becomes float32 absmax exactly.
bitsandbytes' FP4 is not E2M1 (its levels are 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1 of absmax;
lowbit's fp4 has 1/12 where bitsandbytes has 1/192), so fp4 is refused both ways.

Double quantization (``bnb_4bit_use_double_quant``, read only): ``absmax`` is uint8 codes into
``NAME.weight.nested_quant_map`` (256 float32), with ``NAME.weight.nested_absmax`` (float32, one
per ``nested_blocksize`` absmax codes) and ``nested_offset`` in the JSON:
``absmax[j] = nested_quant_map[q[j]] * nested_absmax[j // nested_blocksize] + nested_offset``.

LLM.int8: ``NAME.weight`` int8 (N, K), ``NAME.SCB`` float32 (N,) = absmax of each row,
``NAME.weight_format`` uint8 0 ("row"); value = code * SCB / 127. lowbit's per-channel int8
scale times 127 is exact in float32 for float16 and bfloat16 scales.

``config.json`` carries ``quantization_config`` as transformers writes it (``quant_method``
"bitsandbytes", ``load_in_4bit`` / ``load_in_8bit``, ``bnb_4bit_*``, ``llm_int8_*``), with
``llm_int8_skip_modules`` listing the linears kept in float.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lowbit.core.formats import NF4_LEVELS, get_format
from lowbit.core.tensor import DTYPES, QuantizedTensor
from lowbit.export.base import (
    Exporter,
    ExportError,
    ExportReport,
    assemble_model,
    bits_per_weight,
    float_tensors,
    quantized_linears,
    register_exporter,
    write_hf_folder,
)
from lowbit.nn.linear import QuantizedLinear

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""The 4-bit block sizes bitsandbytes accepts (``quantize_4bit``)."""
QUANT_STATE = "weight.quant_state.bitsandbytes__"
FOUR_BIT_KEYS = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                 "weight.nested_quant_map", QUANT_STATE + "nf4", QUANT_STATE + "fp4")
INT8_KEYS = ("weight", "SCB", "weight_format")
"""The tensors of one linear NAME, by name after ``NAME.``."""
INT8_ROW_FORMAT = 0
"""``weight_format`` of row-major int8 weights, the only one bitsandbytes still reads."""
_TYPE_NAMES = {t: n for n, t in DTYPES.items()}


# -- which lowbit weights fit -------------------------------------------------------------------


def nf4_blocksize(qt: QuantizedTensor) -> int | None:
    """bitsandbytes' blocksize for a lowbit NF4 weight, or None when its blocks are not runs of
    a valid blocksize in the flattened weight (groups of g columns with K % g == 0)."""
    k = qt.shape[1]
    rows, cols = qt.block_size
    cols = min(cols, k)
    if rows != 1 or k % cols or cols not in BLOCKSIZES:
        return None
    return cols


def _nearest_nf4(k: int, group: int) -> str:
    fits = [b for b in BLOCKSIZES if k % b == 0]
    if not fits:
        return (f"no bitsandbytes block size ({BLOCKSIZES[0]}..{BLOCKSIZES[-1]}) divides its {k} inputs: "
                "keep this layer in float (--ignore)")
    best = min(fits, key=lambda b: (abs(math.log2(b / group)), b))
    return f"use --scheme nf4g{best}"


def unsupported_reason(qt: QuantizedTensor) -> str | None:
    """None when bitsandbytes holds ``qt`` exactly, else one line naming a scheme that works."""
    fmt = qt.format.name
    if len(qt.shape) != 2:
        return "bitsandbytes holds 2-D linear weights only"
    if getattr(qt, "super_scale", None) is not None:
        return "bitsandbytes holds one float scale per block, not two-level (k-quant) scales: use --format gguf"
    if qt.group_index is not None:
        return "bitsandbytes has no act-order group index: quantize without act-order, or use --format gptq"
    if fmt == "nf4":
        if nf4_blocksize(qt) is not None:
            return None
        k = qt.shape[1]
        return (f"bitsandbytes' blocks of {BLOCKSIZES[0]}..{BLOCKSIZES[-1]} values run through the flattened "
                f"weight, so a block must divide the row: blocks {tuple(qt.block_size)} do not divide "
                f"{k} inputs; " + _nearest_nf4(k, qt.block_size[1]))
    if fmt == "fp4":
        return ("bitsandbytes' fp4 is not E2M1 (its smallest nonzero level is absmax/192, lowbit's "
                "absmax/12): use --scheme nf4")
    if qt.format.kind == "lookup":
        return f"bitsandbytes has no {fmt} table (its fp4 is not lowbit's either): use --scheme nf4"
    if fmt == "int8" and qt.zero_point is None:
        if qt.block_size[-1] < qt.shape[-1] or qt.block_size[0] != 1:
            return "bitsandbytes' LLM.int8 holds one scale per output row: use --scheme w8"
        return None
    if fmt.startswith(("int", "uint")):
        kind = f"int{qt.format.bits}" + (" asymmetric" if qt.zero_point is not None else "")
        grain = "per channel" if qt.block_size[-1] >= qt.shape[-1] else f"in groups of {qt.block_size[-1]}"
        return (f"bitsandbytes holds nf4 and int8 per channel only, not {kind} {grain}: use --format "
                "compressed-tensors for int4 groups, or --scheme nf4 / w8")
    return f"bitsandbytes holds nf4 and int8 per channel only, not {fmt}: use --format compressed-tensors"


def _refuse(qt: QuantizedTensor) -> None:
    reason = unsupported_reason(qt)
    if reason is not None:
        raise ExportError(reason)


# -- pure repacking: lowbit <-> bitsandbytes tensors -----------------------------------------------


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of any shape -> bitsandbytes' bytes (n/2, 1): two flattened codes per byte,
    the first in the high nibble (an odd count is padded with a zero code)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_4bit``: the first ``numel`` flattened codes (uint8)."""
    b = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    return torch.stack((b >> 4, b & 0x0F), -1).reshape(-1)[:numel]


def quant_state_tensor(state: dict) -> torch.Tensor:
    """A JSON record as the uint8 tensor bitsandbytes stores (``...quant_state.bitsandbytes__nf4``)."""
    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)


def to_bnb_4bit(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """A lowbit NF4 weight -> bitsandbytes' tensors, keyed by name after ``NAME.``."""
    _refuse(qt)
    if qt.format.name != "nf4":
        raise ExportError(f"to_bnb_4bit takes nf4 weights, not {qt.format.name}")
    blocksize = nf4_blocksize(qt)
    state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": _TYPE_NAMES[qt.dtype],
             "shape": list(qt.shape)}
    return {
        "weight": pack_4bit(qt.codes()),
        "weight.absmax": qt.scale.float().reshape(-1).contiguous(),
        "weight.quant_map": torch.tensor(NF4_LEVELS, dtype=torch.float32),
        QUANT_STATE + "nf4": quant_state_tensor(state),
    }


def to_bnb_int8(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """A lowbit int8 per-channel weight -> LLM.int8's tensors, keyed by name after ``NAME.``."""
    _refuse(qt)
    if qt.format.name != "int8":
        raise ExportError(f"to_bnb_int8 takes int8 weights, not {qt.format.name}")
    return {
        "weight": qt.codes().to(torch.int8).contiguous(),
        "SCB": (qt.scale.float() * 127).reshape(-1).contiguous(),
        "weight_format": torch.tensor(INT8_ROW_FORMAT, dtype=torch.uint8),
    }


def _exact_scale(values: torch.Tensor) -> torch.Tensor:
    """float16 when every value converts exactly (lowbit's default scale dtype), else float32."""
    half = values.half()
    return half if torch.equal(half.float(), values) else values


def read_quant_state(t: torch.Tensor, where: str) -> dict:
    try:
        state = json.loads(bytes(t.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
        shape = [int(s) for s in state["shape"]]
        blocksize, quant_type = state["blocksize"], state["quant_type"]
        if len(shape) != 2 or min(shape) < 1 or state["dtype"] not in DTYPES:
            raise ValueError
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise ExportError(f"{where}: its quant_state is not bitsandbytes' JSON record (quant_type, "
                          "blocksize, dtype, shape); re-save the checkpoint") from None
    if quant_type != "nf4":
        raise ExportError(f"{where} is bitsandbytes {quant_type}, whose levels lowbit has no format "
                          "for; lowbit reads bitsandbytes nf4 and int8 checkpoints")
    if blocksize not in BLOCKSIZES or shape[1] % blocksize:
        raise ExportError(f"{where}: blocks of {blocksize} across {shape[1]} inputs straddle rows, which "
                          "lowbit's per-row groups cannot hold")
    return {**state, "shape": shape}


def _nested_absmax(parts: dict[str, torch.Tensor], state: dict, count: int, where: str) -> torch.Tensor:
    """The float32 absmax of a double-quantized weight (module docstring)."""
    codes, code_map = parts["weight.absmax"], parts.get("weight.nested_quant_map")
    absmax2 = parts["weight.nested_absmax"]
    try:
        if code_map is None:
            raise KeyError
        block, offset = int(state["nested_blocksize"]), float(state["nested_offset"])
    except (KeyError, TypeError, ValueError):
        raise ExportError(f"{where}: a double-quantized weight needs nested_quant_map, "
                          "nested_blocksize and nested_offset; re-save the checkpoint") from None
    if (codes.dtype != torch.uint8 or codes.numel() != count or code_map.numel() != 256
            or block < 1 or absmax2.numel() != -(-count // block)):
        raise ExportError(f"{where}: its nested absmax tensors do not fit {count} blocks; re-save the checkpoint")
    values = code_map.float()[codes.reshape(-1).long()]
    index = torch.arange(count) // block
    return values * absmax2.float().reshape(-1)[index] + torch.tensor(offset, dtype=torch.float32)


def from_bnb_4bit(parts: dict[str, torch.Tensor], where: str = "weight") -> QuantizedTensor:
    """bitsandbytes' NF4 tensors (keyed as in ``to_bnb_4bit``) -> a lowbit NF4 weight with the
    same codes; scales are float16 when exact, else float32 (transformers' own absmax)."""
    key = next((k for k in parts if k.startswith(QUANT_STATE)), None)
    if key is None or "weight" not in parts or "weight.absmax" not in parts:
        raise ExportError(f"{where}: a bitsandbytes 4-bit weight needs weight, weight.absmax and "
                          "weight.quant_state; the checkpoint is incomplete")
    state = read_quant_state(parts[key], where)
    n, k = state["shape"]
    blocksize = state["blocksize"]
    packed = parts["weight"]
    if packed.numel() * packed.element_size() != -(-n * k // 2):
        raise ExportError(f"{where}: {packed.numel() * packed.element_size()} bytes of codes for a "
                          f"{n}x{k} weight (expected {-(-n * k // 2)}); the checkpoint is corrupt")
    count = n * k // blocksize
    if "weight.nested_absmax" in parts:
        absmax = _nested_absmax(parts, state, count, where)
    else:
        absmax = parts["weight.absmax"]
        if not absmax.is_floating_point() or absmax.numel() != count:
            raise ExportError(f"{where}: absmax holds {absmax.numel()} {absmax.dtype} values for "
                              f"{count} blocks; the checkpoint is corrupt")
        absmax = absmax.float().reshape(-1)
    codes = unpack_4bit(packed, n * k).reshape(n, k)
    scale = _exact_scale(absmax).reshape(n, k // blocksize)
    return QuantizedTensor.from_codes(codes, scale, None, get_format("nf4"), (1, blocksize),
                                      DTYPES[state["dtype"]])


def from_bnb_int8(parts: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                  where: str = "weight") -> QuantizedTensor:
    """LLM.int8's tensors -> a lowbit int8 per-channel weight: the same codes, scale SCB / 127
    (float16 when exact, as for weights lowbit wrote, else float32)."""
    weight, scb = parts.get("weight"), parts.get("SCB")
    fmt = parts.get("weight_format")
    if fmt is not None and (fmt.numel() != 1 or int(fmt.reshape(-1)[0]) != INT8_ROW_FORMAT):
        raise ExportError(f"{where}: int8 weight_format {fmt.reshape(-1).tolist()} is not row-major (0); "
                          "re-save it with a current bitsandbytes")
    if weight is None or scb is None or weight.dtype != torch.int8 or weight.dim() != 2 \
            or not scb.is_floating_point() or scb.numel() != weight.shape[0]:
        raise ExportError(f"{where}: an LLM.int8 weight needs an int8 (N, K) weight and N float SCB "
                          "values; the checkpoint is corrupt")
    scale = _exact_scale(scb.float().reshape(-1, 1) / 127)
    return QuantizedTensor.from_codes(weight, scale, None, get_format("int8"), (1, weight.shape[1]), dtype)


# -- the exporter -----------------------------------------------------------------------------------


def quantization_config(four_bit: bool, compute_dtype: torch.dtype, skip: list[str]) -> dict:
    """``quantization_config`` as transformers writes it for a BitsAndBytesConfig."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": four_bit, "_load_in_8bit": not four_bit,
        "load_in_4bit": four_bit, "load_in_8bit": not four_bit,
        "bnb_4bit_compute_dtype": _TYPE_NAMES[compute_dtype],
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4" if four_bit else "fp4",
        "bnb_4bit_use_double_quant": False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip,
        "llm_int8_threshold": 6.0,
    }


def _check_model(layers: dict[str, QuantizedLinear]) -> bool:
    """True for a 4-bit model, False for an int8 one; mixed or activation-quantized refused."""
    for name, m in layers.items():
        if m.input_activations or m.output_activations:
            raise ExportError(f"{name} quantizes activations, which a bitsandbytes checkpoint cannot "
                              "record: quantize with a weight-only scheme (nf4 or w8)")
    kinds = {name: m.format_name == "nf4" for name, m in layers.items()}
    if len(set(kinds.values())) > 1:
        eight = next(n for n, four in kinds.items() if not four)
        raise ExportError(f"bitsandbytes loads a model either in 4 bits or in 8 bits, and {eight} is int8 "
                          "among nf4 layers: quantize every layer with nf4, or every one with w8")
    return next(iter(kinds.values()))


@register_exporter
class BitsAndBytesExporter(Exporter):
    name = "bitsandbytes"
    writes = "folder"

    def supports(self, qweight: QuantizedTensor, variant: str | None) -> str | None:
        return unsupported_reason(qweight)

    def write(self, model: nn.Module, tokenizer, out: Path, variant: str | None) -> ExportReport:
        layers = quantized_linears(model)
        four_bit = _check_model(layers)
        report = ExportReport(format=self.name)
        tensors = float_tensors(model)
        stored = weights = 0
        for name, m in layers.items():
            qt = m.qweight
            parts = to_bnb_4bit(qt) if four_bit else to_bnb_int8(qt)
            tensors.update({f"{name}.{k}": v for k, v in parts.items()})
            stored += sum(parts[k].numel() * parts[k].element_size()
                          for k in ("weight", "weight.absmax", "SCB") if k in parts)
            weights += qt.numel
            if four_bit:
                report.layers[name] = f"nf4 blocksize {nf4_blocksize(qt)}"
            else:
                report.layers[name] = "int8 per row (LLM.int8)"
                if qt.scale.dtype == torch.float32:
                    scb = (qt.scale.double() * 127).float() / 127
                    changed = int((scb.double() != qt.scale.double()).sum())
                    if changed:
                        report.lossy.append(f"{name}: SCB = scale * 127 rounded to float32 changes "
                                            f"{changed} of {qt.scale.numel()} float32 scales by an ulp")
        skip = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
        dtypes = Counter(m.weight_dtype for m in layers.values())
        config = quantization_config(four_bit, dtypes.most_common(1)[0][0], skip)
        report.files = write_hf_folder(out, model, tokenizer, tensors, config)
        report.bits_per_weight = bits_per_weight(stored, weights)
        return report

    def recognizes(self, path: Path) -> bool:
        try:
            config = json.loads((Path(path) / "config.json").read_text())
            return config["quantization_config"]["quant_method"] == "bitsandbytes"
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def read(self, path: Path, device="cpu"):
        from lowbit.pipeline.lazy import Checkpoint

        path = Path(path)
        checkpoint = Checkpoint(path)
        names = set(checkpoint.files)
        four = {n.removesuffix("." + QUANT_STATE + t) for n in names for t in ("nf4", "fp4")
                if n.endswith("." + QUANT_STATE + t)}
        eight = {n.removesuffix(".SCB") for n in names if n.endswith(".SCB")} - four
        keys = {p: FOUR_BIT_KEYS if p in four else INT8_KEYS for p in four | eight}
        owned = {f"{p}.{k}" for p, ks in keys.items() for k in ks} & names
        rest = {n: checkpoint.get(n) for n in sorted(names - owned)}
        floats = Counter(t.dtype for t in rest.values() if t.is_floating_point())
        dtype = floats.most_common(1)[0][0] if floats else torch.float32
        layers = {}
        for prefix in sorted(keys):
            parts = {k: checkpoint.get(f"{prefix}.{k}") for k in keys[prefix] if f"{prefix}.{k}" in names}
            where = f"{path}: {prefix}"
            qt = from_bnb_4bit(parts, where) if prefix in four else from_bnb_int8(parts, dtype, where)
            bias = rest.pop(f"{prefix}.bias", None)
            layers[prefix] = QuantizedLinear(qt, bias)
        if not layers:
            raise ExportError(f"{path} says bitsandbytes but holds no 4-bit or int8 weights; re-save the checkpoint")
        return assemble_model(path, layers, rest, dtype=dtype, device=device)
