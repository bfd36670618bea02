"""AWQ checkpoints in AutoAWQ's GEMM layout, which vLLM (``awq``, ``awq_marlin``) and
transformers (through GPTQModel) read.

Layout sources: AutoAWQ ``awq/modules/linear/gemm.py`` (``WQLinear_GEMM``: buffer shapes, and
``from_linear``: the packing with its order map) and vLLM
``vllm/model_executor/layers/quantization/awq.py`` (config keys ``w_bit`` / ``bits``,
``q_group_size`` / ``group_size``, ``zero_point``, ``modules_to_not_convert``).

One quantized linear NAME (weight (N out, K in), 4-bit codes, groups of g input columns, g
dividing K):

    NAME.qweight  int32 (K, N/8)    codes packed along N: word j of row k holds output columns
                                    8j..8j+7, nibble i (bits 4i..4i+3) holding column 8j + ORDER[i],
                                    ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
    NAME.qzeros   int32 (K/g, N/8)  integer zero points, packed the same way, stored as they are
    NAME.scales   float16 (K/g, N)
    NAME.bias     as in the model

    W[n, k] = scales[k // g, n] * (q[k, n] - z[k // g, n])

config.json ``quantization_config``: {"quant_method": "awq", "version": "gemm", "bits": 4,
"group_size": g, "zero_point": true, "modules_to_not_convert": [...]}, plus vLLM's and AutoAWQ's
older names of the same keys ("w_bit", "q_group_size").

lowbit -> AWQ: uint4 codes and zero points as they are; symmetric int4 codes c as c + 8 with
zero point 8. Reading back, a layer whose zero points are all 8 becomes int4 (symmetric, the same
values), any other uint4 with its zero points.

Not representable (``supports``): other bit widths, lookup and float8 formats, float zero points
(HQQ), act-order ``group_index`` (AWQ has no g_idx), groups that do not divide K, 2-D blocks,
per-tensor or two-level scales, N not a multiple of 8; and, for the whole model (``write``),
different group sizes per layer (so per-channel scales, whose group is each layer's K),
a quantized lm_head, quantized activations.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lowbit.core.formats import get_format
from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import ModelLoadError
from lowbit.export.base import (
    Exporter,
    ExportError,
    ExportReport,
    bits_per_weight,
    float_tensors,
    quantized_linears,
    register_exporter,
    write_hf_folder,
)
from lowbit.export.gptq import (
    check_layers,
    check_part,
    common_refusal,
    float_linears,
    output_name,
    pack_int32,
    read_folder,
    read_quantization_config,
    scheme_hint,
    unpack_int32,
)

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble i of a word holds output column ORDER[i] of its eight."""
INVERSE = tuple(ORDER.index(c) for c in range(8))
"""Column c of eight sits in nibble INVERSE[c]."""
MID = 8
"""The zero point of symmetric int4 codes stored as c + 8."""


# -- pure repacking ----------------------------------------------------------------------------


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """(R, N) unsigned 4-bit codes -> (R, N/8) int32 in AutoAWQ's GEMM order."""
    rows, n = codes.shape
    nibbles = codes.reshape(rows, n // 8, 8)[..., list(ORDER)].reshape(rows, n)
    return pack_int32(nibbles.T, 4).T.contiguous()


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_awq``: (R, N/8) int32 -> (R, N) codes as int64."""
    rows, n = words.shape[0], words.shape[1] * 8
    nibbles = unpack_int32(words.T, 4, n).T.reshape(rows, n // 8, 8)
    return nibbles[..., list(INVERSE)].reshape(rows, n)


def to_awq(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales of a weight ``awq_refusal`` accepts."""
    codes = qt.codes().to(torch.int64)  # (N, K)
    if qt.format.signed:
        q, zeros = codes + MID, torch.full(qt.scale.shape, MID, dtype=torch.int64, device=codes.device)
    else:
        q, zeros = codes, qt.zero_point.to(torch.int64)
    return {
        "qweight": pack_awq(q.T),
        "qzeros": pack_awq(zeros.T),
        "scales": qt.scale.to(torch.float16).T.contiguous(),
    }


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
             dtype: torch.dtype = torch.float16) -> QuantizedTensor:
    """The QuantizedTensor of one layer's AWQ tensors (shapes checked by the caller)."""
    k = qweight.shape[0]
    g = k if group_size == -1 else group_size
    q = unpack_awq(qweight).T  # (N, K)
    zeros = unpack_awq(qzeros).T  # (N, K/g)
    scale = scales.T.contiguous()
    if bool((zeros == MID).all()):
        return QuantizedTensor.from_codes(q - MID, scale, None, get_format("int4"), (1, g), dtype)
    return QuantizedTensor.from_codes(q, scale, zeros.to(torch.uint8), get_format("uint4"), (1, g), dtype)


def awq_refusal(qt: QuantizedTensor) -> str | None:
    """None when AWQ's GEMM layout holds ``qt`` exactly (scales rounded to float16 aside)."""
    reason = common_refusal(qt, "AWQ")
    if reason:
        return reason
    hint = scheme_hint(qt, 4, asym=True)
    if qt.format.bits != 4:
        return f"AWQ stores 4-bit codes only; use {hint} or --format gptq"
    if qt.group_index is not None:
        return ("act-order groups (group_index) do not fit AWQ, which has no g_idx: write it with "
                "--format gptq, or quantize with static groups")
    n, k = qt.shape
    g = qt.block_size[-1]
    if k % g:
        return (f"AWQ needs groups that divide the {k} input columns, not groups of {g}: quantize with "
                f"a group size dividing {k} (e.g. w4g{_divisor(k, g)}-asym) or use --format gptq")
    if n % 8:
        return f"AWQ packs 8 output columns per int32 and this layer has {n}: use --format gptq"
    return None


def _divisor(k: int, g: int) -> int:
    """The largest power-of-two group size <= g that divides k (at least 1)."""
    d = 1
    while d * 2 <= g and k % (d * 2) == 0:
        d *= 2
    return d


@register_exporter
class AWQExporter(Exporter):
    """AWQ GEMM folders; see the module docstring."""

    name = "awq"
    writes = "folder"

    def supports(self, qweight: QuantizedTensor, variant: str | None) -> str | None:
        return awq_refusal(qweight)

    def write(self, model: nn.Module, tokenizer, out: Path, variant: str | None) -> ExportReport:
        layers = quantized_linears(model)
        check_layers(model, layers, "AWQ", lm_head_ok=False)
        groups = Counter(m.qweight.block_size[-1] for m in layers.values())
        if len(groups) > 1:
            per_channel = all(m.qweight.block_size[-1] >= m.qweight.shape[-1] for m in layers.values())
            why = "per-channel scales give each layer its own" if per_channel else (
                f"these layers use {', '.join(map(str, sorted(groups)))}")
            raise ExportError(f"AWQ stores one group size per model and {why}: quantize with groups that "
                              "divide every layer's inputs (e.g. w4g128-asym)")
        (group,) = groups
        report = ExportReport(format=self.name)
        tensors = float_tensors(model)
        stored = numel = 0
        for name, m in layers.items():
            qt = m.qweight
            parts = to_awq(qt)
            if not torch.isfinite(parts["scales"]).all():
                raise ExportError(f"{name}: its scales overflow float16, which AWQ stores: quantize "
                                  "with scale_dtype float16")
            if not torch.equal(parts["scales"].T.to(qt.scale.dtype), qt.scale):
                report.lossy.append(f"{name}: {str(qt.scale.dtype).removeprefix('torch.')} scales rounded "
                                    "to float16 (AWQ stores float16)")
            tensors.update({f"{name}.{k}": v for k, v in parts.items()})
            stored += sum(t.numel() * t.element_size() for t in parts.values())
            numel += qt.numel
            report.layers[name] = f"awq gemm 4-bit {'sym (zero point 8)' if qt.format.signed else 'asym'} group {group}"
        skipped = float_linears(model, output_name(model))
        config = {
            "quant_method": "awq", "version": "gemm", "bits": 4, "w_bit": 4,
            "group_size": group, "q_group_size": group, "zero_point": True,
            "modules_to_not_convert": skipped or None,
        }
        report.bits_per_weight = bits_per_weight(stored, numel)
        report.files = write_hf_folder(out, model, tokenizer, tensors, config)
        return report

    def recognizes(self, path: Path) -> bool:
        return Path(path).is_dir() and read_quantization_config(Path(path), "awq") is not None

    def read(self, path: Path, device="cpu"):
        path = Path(path)
        qc = read_quantization_config(path, "awq")
        if qc is None:
            raise ModelLoadError(f"{path} is not an AWQ checkpoint (no quantization_config with quant_method awq)")
        version = str(qc.get("version") or qc.get("format") or "gemm").lower()
        bits = qc.get("w_bit", qc.get("bits", 4))
        group = qc.get("q_group_size", qc.get("group_size"))
        if version != "gemm" or bits != 4 or not qc.get("zero_point", True):
            raise ModelLoadError(f"{path}: AWQ {version} with {bits}-bit codes, zero_point "
                                 f"{qc.get('zero_point', True)}; lowbit reads the 4-bit GEMM layout with zero points")
        if not isinstance(group, int) or not (group == -1 or group > 0):
            raise ModelLoadError(f"{path}: AWQ group size {group!r} is not -1 or a positive integer")

        def make(name, tensors, shape, dtype):
            n, k = shape
            g = k if group == -1 else group
            if k % g or n % 8:
                raise ModelLoadError(f"{path}: {name} ({n}x{k}) cannot hold AWQ groups of {g} and 8 "
                                     "columns per word; the checkpoint does not fit its config")
            i32 = (torch.int32,)
            qweight = check_part(path, name, "qweight", tensors.get("qweight"), i32, (k, n // 8))
            qzeros = check_part(path, name, "qzeros", tensors.get("qzeros"), i32, (k // g, n // 8))
            scales = check_part(path, name, "scales", tensors.get("scales"),
                                (torch.float16, torch.bfloat16, torch.float32), (k // g, n))
            return from_awq(qweight, qzeros, scales, group, dtype)

        return read_folder(path, ("qweight", "qzeros", "scales"), make, device=device)
