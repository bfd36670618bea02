"""GPTQ checkpoints: the layout AutoGPTQ and GPTQModel write, and vLLM (``gptq``,
``gptq_marlin``) and transformers (through GPTQModel) read.

Layout sources: GPTQModel ``gptqmodel/nn_modules/qlinear/qlinear_cuda_old.py`` (``pack``: the
AutoGPTQ packer, buffer shapes, ``g_idx``), vLLM
``vllm/model_executor/layers/quantization/gptq.py`` (``create_weights``: shapes and the
``K % group_size`` requirement; the v1 kernels add 1 to each unpacked zero point) and
``quantization/utils/gptq_utils.py`` (``dynamic`` rules).

One quantized linear NAME (weight (N out, K in), b bits, groups of g input columns,
G = ceil(K / g) groups; g = -1 in the config means one group of K):

    NAME.qweight  int32 (K*b/32, N)   unsigned codes q packed along K: the codes of one output
                                      column form a little-endian bit stream, code k at bits
                                      [k*b, k*b + b), cut into 32-bit words (``pack_int32``);
                                      3-bit codes straddle words (32 codes fill 3 words)
    NAME.qzeros   int32 (G, N*b/32)   zero points MINUS ONE, packed the same way along N
    NAME.scales   float16 (G, N)
    NAME.g_idx    int32 (K,)          group of input column k: k // g, or act-order's groups
    NAME.bias     as in the model

    W[n, k] = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1))

The "minus one" is AutoGPTQ's v1 convention, ``checkpoint_format: "gptq"``, which vLLM and
transformers read; it is what lowbit writes. GPTQModel's v2 format (``"gptq_v2"``) stores the
zero points as they are; lowbit reads both.

lowbit -> GPTQ: symmetric int{b} codes c are stored as q = c + 2^(b-1) with zero point 2^(b-1)
(stored 2^(b-1) - 1: 7 for 4-bit); asymmetric uint{b} codes and integer zero points as they are.
A zero point of 0 cannot be stored under the v1 convention (GPTQModel clamps 0 - 1 to 0, read
back as 1): such a group is written with zero point 1 and codes + 1, the codes at the top of the
range stay there (one step lower in value), and the report names the loss. A last group shorter
than g (g does not divide K) is stored as AutoGPTQ sizes it (ceil groups, ``g_idx = k // g``);
vLLM refuses such a layer, GPTQModel reads it. Layers kept in float (other than ``lm_head``, which
has its own ``lm_head`` flag) are named in ``dynamic`` rules ``"-:^NAME$"``.

Not representable (``supports``): lookup and float8 formats, 5..7-bit codes, float zero points
(HQQ), 2-D blocks or per-tensor scales, two-level scales, K or N that do not fill whole words;
and, for the whole model (``write``), different bits, group sizes or symmetry per layer, and
quantized activations.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.core.formats import get_format
from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import ModelLoadError
from lowbit.export.base import (
    Exporter,
    ExportError,
    ExportReport,
    assemble_model,
    bits_per_weight,
    float_tensors,
    pack_int32 as row_pack_int32,
    quantized_linears,
    register_exporter,
    unpack_int32 as row_unpack_int32,
    write_hf_folder,
)
from lowbit.nn.linear import QuantizedLinear

logger = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
V1, V2 = "gptq", "gptq_v2"
ZERO_OFFSET = {V1: 1, V2: 0}
"""What a reader adds to each stored zero point, per ``checkpoint_format``."""


# -- pure repacking ----------------------------------------------------------------------------


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(L, C) unsigned b-bit codes -> (L*b/32, C) int32: along dim 0 each column's codes form a
    little-endian bit stream, code i at bits [i*b, i*b + b), cut into 32-bit words (the
    row-wise ``base.pack_int32`` of the transpose)."""
    length = codes.shape[0]
    if (length * bits) % 32:
        raise ValueError(f"{length} codes of {bits} bits do not fill whole int32 words")
    return row_pack_int32(codes.t(), bits).t().contiguous()


def unpack_int32(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: (W, C) int32 -> (length, C) codes as int64."""
    return row_unpack_int32(words.t(), bits, length).t().to(torch.int64)


def group_columns(qt: QuantizedTensor) -> torch.Tensor:
    """``g_idx``: the group of each input column (int32, K)."""
    if qt.group_index is not None:
        return qt.group_index.to(torch.int32)
    return (torch.arange(qt.shape[1], device=qt.qdata.device) // qt.block_size[1]).to(torch.int32)


def to_gptq(qt: QuantizedTensor) -> tuple[dict[str, torch.Tensor], int, int]:
    """The v1 tensors (qweight, qzeros, scales, g_idx) of a weight ``supports`` accepts, and how
    many groups had zero point 0 and how many weights that moved one step (see the module
    docstring)."""
    bits = qt.format.bits
    qmax = (1 << bits) - 1
    codes = qt.codes().to(torch.int64)  # (N, K)
    if qt.format.signed:
        mid = 1 << (bits - 1)
        q, zeros = codes + mid, torch.full(qt.scale.shape, mid, dtype=torch.int64, device=codes.device)
    else:
        q, zeros = codes, qt.zero_point.to(torch.int64)
    g_idx = group_columns(qt)
    low = zeros == 0
    shifted = moved = 0
    if low.any():
        in_low = low[:, g_idx.long()]
        shifted, moved = int(low.sum()), int((in_low & (q == qmax)).sum())
        q = torch.where(in_low, (q + 1).clamp(max=qmax), q)
        zeros = torch.where(low, torch.ones_like(zeros), zeros)
    tensors = {
        "qweight": pack_int32(q.T, bits),
        "qzeros": pack_int32(zeros - 1, bits).T.contiguous(),
        "scales": qt.scale.to(torch.float16).T.contiguous(),
        "g_idx": g_idx.contiguous(),
    }
    return tensors, shifted, moved


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
              bits: int, group_size: int, sym: bool, zero_offset: int = 1,
              dtype: torch.dtype = torch.float16) -> QuantizedTensor:
    """The QuantizedTensor of one layer's GPTQ tensors (shapes checked by the caller).

    Symmetric layers whose zero points are all 2^(b-1) become int{b}; others uint{b} with their
    integer zero points, or float zero points (exact) where a v1 zero point reads as 2^b."""
    n = qweight.shape[1]
    k = qweight.shape[0] * 32 // bits
    q = unpack_int32(qweight, bits, k).T  # (N, K)
    zeros = unpack_int32(qzeros.T, bits, n) + zero_offset  # (N, G)
    scale = scales.T.contiguous()
    g = k if group_size == -1 else group_size
    index = None
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // g):
        index = g_idx.to(torch.int32)
        used = int(index.max()) + 1
        scale, zeros = scale[:, :used].contiguous(), zeros[:, :used]
    mid = 1 << (bits - 1)
    if sym and bool((zeros == mid).all()):
        return QuantizedTensor.from_codes(q - mid, scale, None, get_format(f"int{bits}"), (1, g), dtype, index)
    fmt = get_format(f"uint{bits}")
    zp = zeros.to(torch.uint8) if int(zeros.max()) <= fmt.qmax else zeros.to(scale.dtype)
    return QuantizedTensor.from_codes(q, scale, zp, fmt, (1, g), dtype, index)


# -- what the format can hold ------------------------------------------------------------------


def scheme_hint(qt: QuantizedTensor, bits: int, asym: bool | None = None) -> str:
    """A lowbit scheme name close to ``qt`` with ``bits`` bits, e.g. ``w4g128-asym``."""
    k = qt.shape[-1]
    g = qt.block_size[-1]
    asym = (qt.zero_point is not None) if asym is None else asym
    return f"w{bits}" + (f"g{g}" if g < k else "") + ("-asym" if asym else "")


def common_refusal(qt: QuantizedTensor, target: str) -> str | None:
    """Reasons shared by GPTQ and AWQ: integer codes, integer zero points, one float16 scale per
    output row and group of input columns."""
    fmt = qt.format
    if getattr(qt, "super_scale", None) is not None:
        return (f"{target} stores one float16 scale per group, not two-level (k-quant) scales: "
                f"quantize with {scheme_hint(qt, 4)}")
    if fmt.kind == "lookup":
        other = " (or write it with --format bitsandbytes)" if fmt.name == "nf4" else ""
        return (f"{fmt.name} is a lookup format and {target} stores integer codes: quantize with "
                f"{scheme_hint(qt, 4)}{other}")
    if fmt.kind != "int":
        return f"{target} stores integer codes, not {fmt.name}: write it with --format compressed-tensors"
    if qt.zero_point is not None and qt.zero_point.is_floating_point():
        return (f"float zero points (HQQ) do not fit {target}'s integer qzeros: quantize with "
                f"--method rtn or gptq ({scheme_hint(qt, fmt.bits, True)} keeps integer zero points)")
    if qt.block_size[0] != 1:
        what = "one scale per tensor" if qt.block_size[-1] >= qt.shape[-1] else (
            f"{qt.block_size[0]}x{qt.block_size[1]} blocks")
        return (f"{target} keeps one scale per output row and group of input columns, not {what}: "
                f"quantize with {scheme_hint(qt, fmt.bits)}")
    return None


def gptq_refusal(qt: QuantizedTensor) -> str | None:
    """None when GPTQ holds ``qt`` (possibly with a loss ``write`` reports), else the reason."""
    reason = common_refusal(qt, "GPTQ")
    if reason:
        return reason
    bits = qt.format.bits
    if bits not in BITS:
        return (f"GPTQ stores 2, 3, 4 or 8-bit codes, not {bits}-bit: quantize with "
                f"{scheme_hint(qt, 4)} or {scheme_hint(qt, 8)}")
    n, k = qt.shape
    groups = -(-k // qt.block_size[1])
    if qt.group_index is not None and qt.scale.shape[1] != groups:
        return (f"its group_index uses {qt.scale.shape[1]} groups where GPTQ's readers expect "
                f"ceil({k} / {qt.block_size[1]}) = {groups}: write it with --format compressed-tensors")
    for what, size in (("input columns", k), ("output rows", n)):
        if (size * bits) % 32:
            return (f"its {size} {what} do not fill whole int32 words of {bits}-bit codes (GPTQ needs "
                    f"a multiple of {32 // math.gcd(32, bits)}): write it with --format compressed-tensors")
    return None


def layer_group(qt: QuantizedTensor) -> int:
    """Group size of a layer in GPTQ's terms: -1 for one group per row (per channel)."""
    g = qt.block_size[-1]
    return -1 if g >= qt.shape[-1] else g


def model_group(layers: dict[str, QuantizedLinear], target: str) -> int:
    """The one group size (-1: per channel) that describes every layer, or ExportError."""
    groups = Counter(layer_group(m.qweight) for m in layers.values())
    real = sorted(g for g in groups if g != -1)
    if len(real) > 1:
        raise ExportError(f"{target} stores one group size per model; these layers use groups of "
                          f"{', '.join(map(str, real))}: quantize all linears with one group size "
                          "(or use --format compressed-tensors)")
    if not real:
        return -1
    g = real[0]
    for name, m in layers.items():
        if layer_group(m.qweight) == -1 and m.qweight.shape[-1] > g:
            raise ExportError(f"{target} stores one group size per model: {name} is per channel, the "
                              f"others use groups of {g}: quantize all linears with groups of {g}")
    return g


def check_layers(model: nn.Module, layers: dict[str, QuantizedLinear], target: str, lm_head_ok: bool) -> None:
    """Refusals for the whole model: quantized activations, a quantized lm_head where the target
    cannot hold one (or while tied to the embeddings)."""
    for name, m in layers.items():
        acts = m.input_activations or m.output_activations
        if acts is not None:
            raise ExportError(f"{target} is weight-only and {name} quantizes activations "
                              f"({acts.describe()}): write it with --format compressed-tensors")
    head = output_name(model)
    if head in layers:
        if not lm_head_ok:
            raise ExportError(f"{target} keeps {head} in float and it is quantized: quantize again "
                              f"with {head} ignored (lowbit's default)")
        if getattr(model.config, "tie_word_embeddings", False):
            raise ExportError(f"{head} is quantized but tied to the input embeddings, which {target} "
                              f"cannot express: quantize again with {head} ignored")


def output_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def float_linears(model: nn.Module, skip: str | None) -> list[str]:
    """Names of linears left in float (``skip``: the output head, described elsewhere)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != skip]


def quantizer_meta() -> dict:
    return {"quantizer": [f"lowbit:{lowbit.__version__}"]}


# -- reading -------------------------------------------------------------------------------------


def read_quantization_config(path: Path, method: str) -> dict | None:
    """``quantization_config`` of ``path/config.json`` when its quant_method is ``method``;
    for GPTQ also an older AutoGPTQ ``quantize_config.json``. None when neither is there."""
    config = _json(path / "config.json")
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == method:
        return qc
    if method == "gptq" and not isinstance(qc, dict):
        old = _json(path / "quantize_config.json")
        if isinstance(old, dict) and "bits" in old and "group_size" in old:
            return old
    return None


def _json(file: Path):
    try:
        return json.loads(file.read_text()) if file.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def linear_shapes(path: Path) -> dict[str, tuple[int, int, bool]]:
    """``{name: (out, in, has bias)}`` of the linears of ``path``'s architecture (no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot read the config of {path}: {str(err).strip().splitlines()[0]}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return {n: (m.out_features, m.in_features, m.bias is not None)
            for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def read_folder(path: Path, parts: tuple[str, ...], make, device="cpu"):
    """(model, tokenizer) of a folder whose quantized linears are stored as ``NAME.<parts>``.

    ``make(name, tensors, (out, in), dtype)`` turns one layer's stored tensors (a dict by part,
    only those present) into a QuantizedTensor, or raises ModelLoadError. Everything else is read
    as float tensors into the config's architecture (``assemble_model``)."""
    from lowbit.pipeline.lazy import Checkpoint

    checkpoint = Checkpoint(path, check_finite=True)
    shapes = linear_shapes(path)
    names = sorted({k.removesuffix(f".{parts[0]}") for k in checkpoint.files if k.endswith(f".{parts[0]}")})
    if not names:
        raise ModelLoadError(f"{path} holds no *.{parts[0]} tensors: it is not a quantized checkpoint of this layout")
    stored = {f"{n}.{p}" for n in names for p in parts}
    dtype = _float_dtype(checkpoint, stored)
    layers = {}
    for name in names:
        if name not in shapes:
            raise ModelLoadError(f"{path}: {name} is not a linear of this model's architecture; the "
                                 "checkpoint does not fit its config")
        out_f, in_f, has_bias = shapes[name]
        tensors = {p: checkpoint.get(f"{name}.{p}") for p in parts if f"{name}.{p}" in checkpoint}
        qt = make(name, tensors, (out_f, in_f), dtype)
        bias = checkpoint.get(f"{name}.bias") if f"{name}.bias" in checkpoint else None
        if (bias is not None) != has_bias:
            raise ModelLoadError(f"{path}: {name} {'has' if bias is not None else 'lacks'} a stored bias, "
                                 "unlike the model's layer; the checkpoint does not fit its config")
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ModelLoadError(f"{path}: {name}.bias has shape {list(bias.shape)}, the layer {out_f} outputs")
        layers[name] = QuantizedLinear(qt, bias)
    skip = stored | {f"{n}.bias" for n in names}
    tensors = {k: checkpoint.get(k) for k in checkpoint.files if k not in skip}
    return assemble_model(path, layers, tensors, dtype=dtype, device=device)


def _float_dtype(checkpoint, skip: set[str]) -> torch.dtype:
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    counts = Counter(e.dtype for n, e in checkpoint.entries.items() if n not in skip and e.dtype in names)
    return names[counts.most_common(1)[0][0]] if counts else torch.float16


def check_part(path: Path, name: str, part: str, t: torch.Tensor | None, dtypes, shape) -> torch.Tensor:
    """Refuse a missing tensor, or one of another dtype or shape than the layout needs."""
    if t is None:
        raise ModelLoadError(f"{path}: quantized layer {name} lacks {name}.{part}; the checkpoint is incomplete")
    if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
        raise ModelLoadError(f"{path}: {name}.{part} is {str(t.dtype).removeprefix('torch.')} "
                             f"{list(t.shape)}, the layout needs {list(shape)}; the checkpoint is corrupt "
                             "or does not fit its config")
    return t


def dynamic_value(qc: dict, name: str, key: str, default):
    """A layer's setting under GPTQModel's ``dynamic`` rules (first matching rule wins, as vLLM)."""
    for pattern, values in (qc.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            continue
        if re.match(pattern.removeprefix("+:"), name) and isinstance(values, dict):
            return values.get(key, default)
    return default


# -- the exporter --------------------------------------------------------------------------------


@register_exporter
class GPTQExporter(Exporter):
    """GPTQ folders (checkpoint_format "gptq"); see the module docstring."""

    name = "gptq"
    writes = "folder"

    def supports(self, qweight: QuantizedTensor, variant: str | None) -> str | None:
        return gptq_refusal(qweight)

    def write(self, model: nn.Module, tokenizer, out: Path, variant: str | None) -> ExportReport:
        layers = quantized_linears(model)
        check_layers(model, layers, "GPTQ", lm_head_ok=True)
        settings = Counter((m.qweight.format.bits, m.qweight.format.signed) for m in layers.values())
        if len(settings) > 1:
            kinds = ", ".join(f"{b}-bit {'sym' if s else 'asym'}" for b, s in sorted(settings))
            raise ExportError(f"GPTQ stores one bit width and symmetry per model; these layers mix {kinds}: "
                              "quantize all linears with one scheme (or use --format compressed-tensors)")
        (bits, sym), = settings
        group = model_group(layers, "GPTQ")
        report = ExportReport(format=self.name)
        tensors = float_tensors(model)
        stored = numel = 0
        for name, m in layers.items():
            qt = m.qweight
            parts, shifted, moved = to_gptq(qt)
            if not torch.isfinite(parts["scales"]).all():
                raise ExportError(f"{name}: its scales overflow float16, which GPTQ stores: quantize "
                                  "with scale_dtype float16")
            if not torch.equal(parts["scales"].T.to(qt.scale.dtype), qt.scale):
                report.lossy.append(f"{name}: {str(qt.scale.dtype).removeprefix('torch.')} scales rounded "
                                    "to float16 (GPTQ stores float16)")
            if shifted:
                report.lossy.append(
                    f"{name}: {shifted} groups with zero point 0, which checkpoint_format gptq cannot "
                    f"store (it stores zero - 1), written with zero point 1; {moved} weights moved one "
                    "step down")
            tensors.update({f"{name}.{k}": v for k, v in parts.items()})
            stored += sum(t.numel() * t.element_size() for t in parts.values())
            numel += qt.numel
            report.layers[name] = self._describe(qt, group)
        head = output_name(model)
        config = {
            "quant_method": "gptq", "bits": bits, "group_size": group,
            "desc_act": any(m.qweight.group_index is not None for m in layers.values()),
            "sym": sym, "checkpoint_format": V1, "lm_head": head in layers,
            "true_sequential": True, "meta": quantizer_meta(),
        }
        skipped = float_linears(model, head)
        if skipped:
            config["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in skipped}
        ragged = [n for n, text in report.layers.items() if "last group" in text]
        if ragged:
            logger.warning("%d layers (e.g. %s) end in a group shorter than %d columns: GPTQModel reads "
                           "them, vLLM refuses K %% group_size != 0", len(ragged), ragged[0], group)
        report.bits_per_weight = bits_per_weight(stored, numel)
        report.files = write_hf_folder(out, model, tokenizer, tensors, config)
        return report

    @staticmethod
    def _describe(qt: QuantizedTensor, group: int) -> str:
        k = qt.shape[-1]
        text = f"gptq {qt.format.bits}-bit {'sym' if qt.format.signed else 'asym'} "
        text += "per channel" if group == -1 else f"group {group}"
        if qt.group_index is not None:
            text += ", act-order g_idx"
        if group != -1 and k % group:
            text += f" (last group {k % group} columns: vLLM needs K % group_size == 0)"
        return text

    def recognizes(self, path: Path) -> bool:
        return Path(path).is_dir() and read_quantization_config(Path(path), "gptq") is not None

    def read(self, path: Path, device="cpu"):
        path = Path(path)
        qc = read_quantization_config(path, "gptq")
        if qc is None:
            raise ModelLoadError(f"{path} is not a GPTQ checkpoint (no quantization_config with quant_method gptq)")
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or V1).lower()
        if fmt not in ZERO_OFFSET:
            raise ModelLoadError(f"{path}: checkpoint_format {fmt!r} is not one lowbit reads "
                                 f"({V1}, {V2}); convert it with GPTQModel to {V1}")

        def make(name, tensors, shape, dtype):
            bits = dynamic_value(qc, name, "bits", qc.get("bits"))
            group = dynamic_value(qc, name, "group_size", qc.get("group_size"))
            sym = dynamic_value(qc, name, "sym", qc.get("sym", True))
            if bits not in BITS or not isinstance(group, int) or not (group == -1 or group > 0):
                raise ModelLoadError(f"{path}: {name} has bits {bits!r}, group_size {group!r}; lowbit reads "
                                     "GPTQ's 2, 3, 4 and 8 bits with group_size -1 or > 0")
            n, k = shape
            if (k * bits) % 32 or (n * bits) % 32:
                raise ModelLoadError(f"{path}: {name} ({n}x{k}) cannot hold {bits}-bit GPTQ words; "
                                     "the checkpoint does not fit its config")
            groups = 1 if group == -1 else -(-k // group)
            i32 = (torch.int32,)
            qweight = check_part(path, name, "qweight", tensors.get("qweight"), i32, (k * bits // 32, n))
            g_idx = tensors.get("g_idx")
            if g_idx is not None:
                g_idx = check_part(path, name, "g_idx", g_idx, (torch.int32, torch.int64), (k,))
                if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
                    raise ModelLoadError(f"{path}: {name}.g_idx names groups outside 0..{groups - 1}; "
                                         "the checkpoint is corrupt")
            qzeros = check_part(path, name, "qzeros", tensors.get("qzeros"), i32, (groups, n * bits // 32))
            scales = check_part(path, name, "scales", tensors.get("scales"),
                                (torch.float16, torch.bfloat16, torch.float32), (groups, n))
            return from_gptq(qweight, qzeros, scales, g_idx, bits, group, bool(sym), ZERO_OFFSET[fmt], dtype)

        return read_folder(path, ("qweight", "qzeros", "scales", "g_idx"), make, device=device)
