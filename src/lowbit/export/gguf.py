"""GGUF export: a llama.cpp file whose block codes are lowbit's own.

``--format gguf:FILE_TYPE`` (``Q4_0``, ``Q4_K_M``, ...; ``lowbit.export.gguf_types``) writes:

- every quantized linear in the block type its grid is (``lowbit.export.gguf_blocks``), which
  must be the type llama.cpp's rules give that tensor in FILE_TYPE: quantize with
  ``--scheme gguf:FILE_TYPE`` to get exactly that plan (fallbacks included);
- the token embeddings (and a float output matrix) in the type the rules give them, rounded by
  lowbit's round-to-nearest on that grid at export time (llama.cpp does not calibrate them
  either); norms and other vectors in F32;
- the header: architecture, hyper-parameters and tokenizer copied from the model's source GGUF
  file (the bundled models and any model loaded from a .gguf), or for a Llama-family model from
  a Hugging Face folder written from its config and tokenizer (``gguf_header``), with
  ``general.file_type`` set and a ``lowbit.export`` entry first.

Llama-family q/k rows are permuted into llama.cpp's rotary order (convert_hf_to_gguf.py's
``permute``; transformers undoes it when it reads the file), and Gemma's norm weights are
written as ``1 + w`` (llama.cpp applies them without Gemma's offset), both exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from lowbit.core.args import GGUF_WEIGHT_TYPES, QuantArgs, parse_args
from lowbit.core.quantize import quantize
from lowbit.core.tensor import QuantizedTensor
from lowbit.export.base import (
    Exporter,
    ExportError,
    ExportReport,
    bits_per_weight,
    float_tensors,
    quantized_linears,
    register_exporter,
)
from lowbit.export.gguf_blocks import PACKERS, pack_float, q1_offset_error
from lowbit.export.gguf_header import write_llama_header
from lowbit.export.gguf_types import (
    FILE_TYPES,
    TensorChoice,
    canonical_file_type,
    file_type_id,
    tensor_role,
    tensor_type,
)
from lowbit.outputs import GGUF_MARKER_KEY

log = logging.getLogger(__name__)

_SKIP_KEYS = ("GGUF.", "general.file_type", "general.quantization_version", "split.", GGUF_MARKER_KEY)
_PERMUTED = {"llama"}
"""GGUF architectures whose q/k rows llama.cpp expects in its rotary order."""
_NORM_PLUS_ONE = {"gemma", "gemma2", "gemma3"}


def gguf_type_of(qt: QuantizedTensor) -> str | None:
    """The GGUF block type whose grid ``qt`` lies on, or None."""
    if qt.group_index is not None:
        return None
    for name, fields in GGUF_WEIGHT_TYPES.items():
        args = QuantArgs(**fields)
        if (qt.format == args.code_format and tuple(qt.block_size) == (1, args.group_size)
                and (qt.zero_point is None) == args.symmetric
                and qt.super_block == args.super_block
                and (qt.scale_format is None) == (args.scale_format is None)
                and (qt.scale_format is None or qt.scale_format.name == args.scale_format)
                and ((qt.super_scale if qt.two_level else qt.scale).dtype == torch.float16)
                and (qt.zero_point is None or qt.two_level or not qt.zero_point.is_floating_point())):
            return name
    return None


def permute_rows(qt: QuantizedTensor, perm: torch.Tensor) -> QuantizedTensor:
    """``qt`` with its rows reordered (exact: blocks lie within rows)."""
    if qt.block_size[0] != 1:
        raise ExportError("rows can be reordered only for per-row blocks")
    pick = lambda t: None if t is None else t.index_select(0, perm)  # noqa: E731
    # codes are packed along rows, so the packed rows move as they are
    return QuantizedTensor(pick(qt.qdata), pick(qt.scale), pick(qt.zero_point), qt.format, qt.block_size,
                           qt.shape, qt.dtype, None, pick(qt.super_scale), pick(qt.super_min),
                           qt.scale_format, qt.super_block)


def rotary_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k: within each head, rows (0, d, 1, d + 1, ...) of HF's halves."""
    d = rows // heads // 2
    return torch.arange(rows).view(heads, 2, d).transpose(1, 2).reshape(-1)


@register_exporter
class GGUFExporter(Exporter):
    name = "gguf"
    writes = "file"
    variants = tuple(FILE_TYPES)

    def check_variant(self, variant):
        return None if variant is None else canonical_file_type(variant)

    def writes_float(self, variant):
        return variant in ("F32", "F16", "BF16")

    def supports(self, qweight, variant):
        if self.writes_float(variant):
            return f"gguf:{variant} is a float file; export the float model, not a quantized one"
        t = gguf_type_of(qweight)
        if t is None:
            hint = f"--scheme gguf:{variant}" if variant else "--scheme gguf:Q4_K_M (or q4_0, q8_0, iq4_nl, ...)"
            return (f"its grid ({qweight.format.name}, blocks {list(qweight.block_size)}) is no GGUF "
                    f"block type; quantize with {hint}")
        if qweight.shape[-1] % (qweight.super_block or qweight.block_size[-1]):
            return (f"{qweight.shape[-1]} columns are not a multiple of {t}'s block; quantize with "
                    "--scheme gguf:FILE_TYPE, which applies llama.cpp's fallbacks")
        return None

    def write(self, model: nn.Module, tokenizer, out: Path, variant: str | None, source=None) -> ExportReport:
        import gguf

        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        reader = None
        if source is not None:
            reader = gguf.GGUFReader(str(source))
            arch = _field(reader, "general.architecture")
        else:
            arch = "llama"  # the header is lowbit's own (gguf_header), Llama family only
        n_layers = config.num_hidden_layers
        names = gguf.get_tensor_name_map(_arch_enum(arch), n_layers)
        layers = quantized_linears(model)
        floats = float_tensors(model)
        file_type = variant or _dominant_type(layers)
        report = ExportReport(format="gguf")
        tied = "lm_head.weight" not in floats and "lm_head" not in layers
        writer = gguf.GGUFWriter(str(out), arch)
        # first, so that lowbit.outputs.is_lowbit_file finds it near the start of the file
        writer.add_string(GGUF_MARKER_KEY, json.dumps({"file_type": file_type}))
        if reader is not None:
            _copy_header(reader, writer)
        else:
            write_llama_header(writer, config, tokenizer)
        writer.add_uint32("general.file_type", file_type_id(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        q_bytes = q_numel = 0
        entries = [(n, m.qweight) for n, m in layers.items()] + list(floats.items())
        for hf_name, value in entries:
            key = hf_name if hf_name in floats else hf_name + ".weight"
            gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ExportError(f"no GGUF name for {key} in architecture {arch}")
            role, i_layer = tensor_role(gname)
            if isinstance(value, QuantizedTensor):
                qt = _rotary(value, role, arch, config)
                written = gguf_type_of(qt)
                choice = tensor_type(file_type, role, i_layer, n_layers, qt.shape[-1])
                if variant is None:  # no file type asked: the grids as quantized
                    choice = TensorChoice(written, written)
                elif written != choice.type:
                    raise ExportError(
                        f"{hf_name} is quantized as {written}, but llama.cpp's {file_type} puts "
                        f"{choice.type} there; quantize with --scheme gguf:{file_type}")
                data = PACKERS[written](qt)
                if written in ("Q4_1", "Q5_1"):
                    report.lossy.append(f"{gname}: {written} offset rounded to float16, max weight "
                                        f"change {q1_offset_error(qt):.3g}")
                q_bytes += data.numel()
                q_numel += qt.numel
                writer.add_tensor(gname, data.numpy(), raw_dtype=gguf.GGMLQuantizationType[written])
                report.layers[gname] = written + (f" (fallback from {choice.asked}: {choice.reason})"
                                                  if choice.reason else "")
                if choice.reason:
                    report.fallbacks.append(f"{gname}: {choice.asked} -> {written} ({choice.reason})")
                continue
            t = value.float()
            if arch in _NORM_PLUS_ONE and gname.endswith("norm.weight"):
                t = t + 1
            if t.dim() < 2:
                writer.add_tensor(gname, t.numpy())
                continue
            rule_role = "output" if role == "token_embd" and tied else role
            choice = tensor_type(file_type, rule_role, i_layer, n_layers, t.shape[-1])
            if choice.type in PACKERS:
                qt = quantize(_rotary_float(t, role, arch, config), parse_args(choice.type))
                data = PACKERS[choice.type](qt)
                writer.add_tensor(gname, data.numpy(), raw_dtype=gguf.GGMLQuantizationType[choice.type])
                report.layers[gname] = f"{choice.type} (rounded to nearest at export)"
            else:
                data = pack_float(_rotary_float(t, role, arch, config), choice.type)
                writer.add_tensor(gname, data.numpy())
                report.layers[gname] = choice.type
            if i_layer >= 0:  # a float decoder matrix (float file types)
                q_bytes += data.numel() * data.element_size()
                q_numel += t.numel()
        report.bits_per_weight = bits_per_weight(q_bytes, q_numel)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        report.files = [out.name]
        return report


def _rotary(qt: QuantizedTensor, role: str, arch: str, config) -> QuantizedTensor:
    if arch not in _PERMUTED or role not in ("attn_q", "attn_k"):
        return qt
    heads = config.num_attention_heads if role == "attn_q" else config.num_key_value_heads
    return permute_rows(qt, rotary_permutation(qt.shape[0], heads))


def _rotary_float(t: torch.Tensor, role: str, arch: str, config) -> torch.Tensor:
    if arch not in _PERMUTED or role not in ("attn_q", "attn_k"):
        return t
    heads = config.num_attention_heads if role == "attn_q" else config.num_key_value_heads
    return t.index_select(0, rotary_permutation(t.shape[0], heads))


def _dominant_type(layers) -> str:
    """The file type named by the most common block type among the quantized linears (a
    k-quant names its _M mixture), for ``general.file_type`` and the embeddings' rule."""
    from collections import Counter

    counts = Counter(gguf_type_of(m.qweight) for m in layers.values())
    block = counts.most_common(1)[0][0]
    return {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}.get(block, block)


def _arch_enum(arch: str):
    import gguf

    for key, value in gguf.MODEL_ARCH_NAMES.items():
        if value == arch:
            return key
    raise ExportError(f"gguf-py does not know the architecture {arch!r}")


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise ExportError(f"the source GGUF file has no {key}")
    return field.contents()


def _copy_header(reader, writer) -> None:
    """Every key-value entry of the source file except file type, quantization version, split
    entries and the ones GGUFWriter writes itself (architecture)."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith(_SKIP_KEYS) or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        value = field.contents()
        writer.add_key_value(key, value, vtype, sub_type=sub)
