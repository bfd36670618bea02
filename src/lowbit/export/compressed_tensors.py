"""compressed-tensors (vLLM, transformers): write and read the ``pack-quantized`` folder.

The layout is the one of the compressed-tensors package (vllm-project/compressed-tensors 0.20.1:
``compressors/pack_quantized/base.py`` and ``helpers.py`` for the tensors,
``compressors/naive_quantized/base.py`` for FP8, ``quantization/quant_config.py``,
``quant_scheme.py`` and ``quant_args.py`` for the config). For a quantized linear NAME with
weight (N out, K in), b-bit codes and G groups:

    NAME.weight_packed      int32 (N, ceil(K*b/32)): each row is one little-endian bit stream
                            of unsigned codes u = signed code + 2**(b-1); code k occupies bits
                            [k*b, (k+1)*b) of the stream, i.e. bits (k*b) % 32 .. of word
                            k*b // 32 (``pack_int32``; b = 4: 8 codes per word, code 0 lowest)
    NAME.weight_scale       the scale, (N, G) per group, (N, 1) per channel, (1,) per tensor
    NAME.weight_zero_point  asymmetric only: signed zero points z - 2**(b-1), packed like the
                            codes but along dim 0 (int32 (ceil(N*b/32), G)); per tensor int8 (1,)
    NAME.weight_shape       int64 [N, K]
    NAME.weight_g_idx       int32 (K,), the group of each column (GPTQ act-order, old readers)

    value = (signed code - signed zero point) * scale  (= lowbit's (code - zero_point) * scale)

FP8 weights (``naive-quantized``): NAME.weight float8_e4m3fn (N, K) and NAME.weight_scale.

lowbit's symmetric ``intB`` codes are signed already; asymmetric ``uintB`` codes c and zero
points z are signed as c - 2**(b-1) and z - 2**(b-1), so the unsigned words hold c and z as
they are. config.json carries ``quantization_config`` with ``quant_method``
"compressed-tensors", ``format``, ``config_groups`` (one scheme per distinct weight layout,
``targets`` "Linear" when every quantized linear shares it, else exact layer names),
``ignore`` (the linears kept in float) and ``quantization_status`` "compressed".
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lowbit.core.formats import get_format
from lowbit.core.tensor import QuantizedTensor
from lowbit.export.base import (
    Exporter,
    ExportError,
    ExportReport,
    assemble_model,
    bits_per_weight,
    float_tensors,
    pack_int32,
    quantized_linears,
    register_exporter,
    unpack_int32,
    write_hf_folder,
)
from lowbit.nn.linear import ACTIVATION_FIELDS, QuantizedLinear

QUANT_METHOD = "compressed-tensors"
PACKED = "pack-quantized"
NAIVE = "naive-quantized"
LAYOUT_VERSION = "0.20.1"
"""The compressed-tensors release whose layout this module follows (config.json ``version``)."""
PACKABLE_BITS = (2, 4, 8)
"""Bit widths whose words are the same in every compressed-tensors release (3, 5, 6 and 7 were
padded per word before 0.20 and are a dense stream since, so a reader may misread them)."""
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# -- pure repacking -----------------------------------------------------------------------------


def strategy(qweight: QuantizedTensor) -> str:
    """compressed-tensors' strategy for lowbit's block size: tensor, channel, group or block."""
    rows, cols = qweight.block_size
    n, k = qweight.shape
    if (rows, cols) == (n, k) and n > 1:
        return "tensor"
    if rows != 1:
        return "block"
    return "channel" if cols >= k else "group"


def weight_args(qweight: QuantizedTensor) -> dict:
    """The ``weights`` QuantizationArgs of a layer, as config.json holds them."""
    fmt = qweight.format
    kind = strategy(qweight)
    args = {
        "num_bits": fmt.bits, "type": "float" if fmt.kind == "float" else "int",
        "symmetric": qweight.zero_point is None, "group_size": None, "strategy": kind,
        "dynamic": False,
    }
    if kind == "group":
        args["group_size"] = qweight.block_size[-1]
    if qweight.group_index is not None:
        args["actorder"] = "group"
    return args


def _offset(bits: int) -> int:
    return 1 << (bits - 1)


def stored_scale(qweight: QuantizedTensor) -> torch.Tensor:
    """The scale in the model's dtype when that holds it exactly (a float32 model, or scales
    already in the model's dtype), else as it is. compressed-tensors computes
    (code - zero point) * scale in the stored scale's dtype when transformers dequantizes on
    load, so float16 scales of a float32 model would round the weights to float16."""
    scale = qweight.scale
    if qweight.dtype == torch.float32 or qweight.dtype == scale.dtype:
        return scale.to(qweight.dtype)
    return scale


def to_compressed(qweight: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The tensors of one linear in compressed-tensors' layout (names without the layer prefix)."""
    fmt, (n, k) = qweight.format, qweight.shape
    kind = strategy(qweight)
    scale = stored_scale(qweight)
    scale = scale.reshape(1) if kind == "tensor" else scale
    if fmt.kind == "float":
        return {"weight": qweight.codes(), "weight_scale": scale.contiguous()}
    bits = fmt.bits
    signed_shift = 0 if fmt.signed else _offset(bits)  # lowbit code -> compressed-tensors' signed code
    unsigned = qweight.codes().to(torch.int16) - signed_shift + _offset(bits)
    out = {
        "weight_packed": pack_int32(unsigned, bits),
        "weight_scale": scale.contiguous(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if qweight.zero_point is not None:
        zero = qweight.zero_point.to(torch.int16) - signed_shift
        if kind == "tensor":
            out["weight_zero_point"] = zero.reshape(1).to(torch.int8)
        else:
            out["weight_zero_point"] = pack_int32(zero.T + _offset(bits), bits).T.contiguous()
    if qweight.group_index is not None:
        out["weight_g_idx"] = qweight.group_index.to(torch.int32)
    return out


def from_compressed(tensors: dict[str, torch.Tensor], args: dict, dtype: torch.dtype = torch.float32
                    ) -> QuantizedTensor:
    """A QuantizedTensor from one linear's compressed-tensors tensors and its ``weights`` args.

    Symmetric int weights become ``intB`` codes, asymmetric ones ``uintB`` codes with integer
    zero points; float weights keep their FP8 codes. Raises ValueError on shapes that disagree."""
    bits, kind = int(args["num_bits"]), _strategy_of(args)
    symmetric = args.get("symmetric", True)
    scale = tensors["weight_scale"]
    if args.get("type", "int") == "float":
        if bits != 8:
            raise ValueError(f"{bits}-bit float weights are not FP8")
        codes = tensors["weight"].to(torch.float8_e4m3fn)
        fmt = get_format("fp8_e4m3")
        n, k = codes.shape
        grid_scale, block = _grid(scale, kind, n, k, args)
        return QuantizedTensor.from_codes(codes, grid_scale, None, fmt, block, dtype)
    if "weight_packed" in tensors:
        n, k = (int(v) for v in tensors["weight_shape"].tolist())
        unsigned = unpack_int32(tensors["weight_packed"], bits, k)
        if tuple(tensors["weight_packed"].shape) != (n, -(-k * bits // 32)):
            raise ValueError(f"weight_packed has shape {list(tensors['weight_packed'].shape)}, "
                             f"not [{n}, {-(-k * bits // 32)}]")
    else:  # int-quantized / naive-quantized: signed int8 codes as they are
        signed = tensors["weight"]
        n, k = signed.shape
        unsigned = signed.to(torch.int16) + _offset(bits)
    grid_scale, block = _grid(scale, kind, n, k, args)
    zero = None
    if not symmetric:
        stored = tensors["weight_zero_point"]
        if kind in ("group", "channel"):
            zero = unpack_int32(stored.T.contiguous(), bits, n).T
        else:
            zero = stored.to(torch.int16).reshape(grid_scale.shape) + _offset(bits)
        if tuple(zero.shape) != tuple(grid_scale.shape):
            raise ValueError(f"weight_zero_point unpacks to {list(zero.shape)}, the scales are "
                             f"{list(grid_scale.shape)}")
    index = tensors.get("weight_g_idx")
    if index is not None:
        index = index.to(torch.int32)
        if torch.equal(index, torch.arange(k, dtype=torch.int32, device=index.device) // block[-1]):
            index = None  # the plain group order: no index needed
    if symmetric:
        fmt = get_format(f"int{bits}")
        codes = (unsigned - _offset(bits)).to(fmt.code_dtype)
        return QuantizedTensor.from_codes(codes, grid_scale, None, fmt, block, dtype, index)
    fmt = get_format(f"uint{bits}")
    return QuantizedTensor.from_codes(unsigned.to(torch.uint8), grid_scale, zero.to(torch.uint8), fmt,
                                      block, dtype, index)


def _strategy_of(args: dict) -> str:
    kind = args.get("strategy")
    if kind is None:  # compressed-tensors infers it from group_size
        group = args.get("group_size")
        kind = "tensor" if group is None else "channel" if group == -1 else "group"
    return kind


def _grid(scale: torch.Tensor, kind: str, n: int, k: int, args: dict):
    """(scale shaped as lowbit's grid, lowbit block size) for a strategy."""
    if kind == "tensor":
        if scale.numel() != 1:
            raise ValueError(f"a per-tensor scale has one value, not {scale.numel()}")
        return scale.reshape(1, 1), (n, k)
    if kind == "channel":
        return scale.reshape(n, 1), (1, k)
    if kind == "group":
        return scale, (1, int(args["group_size"]))
    raise ValueError(f"strategy {kind!r} is not read by lowbit (tensor, channel, group are)")


def describe(qweight: QuantizedTensor) -> str:
    """How a layer is written, e.g. ``pack-quantized int4 group 32 asymmetric``."""
    fmt, kind = qweight.format, strategy(qweight)
    if fmt.kind == "float":
        return f"{NAIVE} {fmt.name} {kind}"
    grain = f"group {qweight.block_size[-1]}" if kind == "group" else kind
    sym = "symmetric" if qweight.zero_point is None else "asymmetric"
    return f"{PACKED} int{fmt.bits} {grain} {sym}"


def quantization_config(layers: dict[str, QuantizedTensor], float_linears: list[str]) -> dict:
    """config.json's ``quantization_config`` for quantized layers (name -> weight) and the
    names of the linears left in float."""
    groups: dict[str, dict] = {}
    for name, qweight in layers.items():
        args = weight_args(qweight)
        key = json.dumps(args, sort_keys=True)
        fmt = NAIVE if qweight.format.kind == "float" else PACKED
        group = groups.setdefault(key, {"targets": [], "weights": args, "input_activations": None,
                                        "output_activations": None, "format": fmt})
        group["targets"].append(name)
    if len(groups) == 1:
        next(iter(groups.values()))["targets"] = ["Linear"]
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": QUANT_METHOD,
        "version": LAYOUT_VERSION,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": list(float_linears),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "moe_sparsity_config": None,
        "sparsity_config": {},
        "transform_config": {},
    }


# -- the exporter -------------------------------------------------------------------------------


@register_exporter
class CompressedTensorsExporter(Exporter):
    name = QUANT_METHOD
    writes = "folder"

    def supports(self, qweight: QuantizedTensor, variant: str | None) -> str | None:
        fmt = qweight.format
        n, k = qweight.shape
        if fmt.kind == "lookup":
            return (f"{fmt.name} is a lookup-table format, which compressed-tensors cannot hold; "
                    "use --format bitsandbytes")
        if qweight.zero_point is not None and qweight.zero_point.is_floating_point():
            return ("float zero points (HQQ) have no compressed-tensors layout; quantize with "
                    "rtn/gptq/awq or a symmetric scheme")
        kind = strategy(qweight)
        if kind == "block":
            return (f"2-D blocks {qweight.block_size[0]}x{qweight.block_size[1]} have no "
                    "weight-only compressed-tensors layout; use a group scheme such as w4g128")
        if fmt.kind == "float":
            if fmt.name != "fp8_e4m3":
                return f"compressed-tensors stores FP8 as E4M3 only; use fp8_e4m3, not {fmt.name}"
            if kind == "group":
                return ("compressed-tensors reads FP8 weights per channel or per tensor, not in "
                        "groups; use fp8_e4m3 (per channel)")
            return None
        if fmt.bits not in PACKABLE_BITS:
            return (f"{fmt.bits}-bit codes are packed differently by different compressed-tensors "
                    f"releases (and vLLM runs 4 and 8 bits); use w4g128 or w8")
        if qweight.group_index is not None:
            return ("act-order groups (group_index) are no longer read by compressed-tensors "
                    "(actorder 'group' was removed); quantize with gptq static_groups=true (the default)")
        g = qweight.block_size[-1]
        if kind == "group" and k % g:
            better = [f"w{fmt.bits}g{d}" for d in (g // 2, g // 4, g // 8) if d >= 8 and k % d == 0]
            hint = " or ".join(better[:2]) if better else f"w{fmt.bits} (per channel)"
            return (f"group {g} does not divide {k} input columns; use a group that divides them, "
                    f"e.g. {hint}")
        return None

    def write(self, model: nn.Module, tokenizer, out: Path, variant: str | None) -> ExportReport:
        layers = quantized_linears(model)
        for name, layer in layers.items():
            acts = [a for a in ACTIVATION_FIELDS if getattr(layer, a) is not None]
            if acts:
                raise ExportError(
                    f"{name} quantizes activations ({getattr(layer, acts[0]).describe()}), which the "
                    "compressed-tensors export does not write yet; quantize with a weight-only "
                    "scheme (W4A16, W8A16)")
        tensors = float_tensors(model)
        report = ExportReport(format=self.name)
        nbytes = numel = 0
        weights = {}
        for name, layer in layers.items():
            qweight = layer.qweight
            weights[name] = qweight
            for key, t in to_compressed(qweight).items():
                tensors[f"{name}.{key}"] = t
                nbytes += t.numel() * t.element_size()
            numel += qweight.numel
            report.layers[name] = describe(qweight)
        float_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        config = quantization_config(weights, float_linears)
        files = write_hf_folder(out, model, tokenizer, tensors, config)
        report.files = [f for f in files if not f.startswith(".")]  # not the partial-write marker
        head = model.get_output_embeddings()
        if isinstance(head, QuantizedLinear) and getattr(model.config, "tie_word_embeddings", False):
            _untie(out / "config.json")
        report.bits_per_weight = bits_per_weight(nbytes, numel)
        return report

    def recognizes(self, path: Path) -> bool:
        try:
            qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config")
        except (OSError, ValueError, AttributeError):
            return False
        return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD

    def read(self, path: Path, device="cpu"):
        path = Path(path)
        qc = json.loads((path / "config.json").read_text())["quantization_config"]
        status = qc.get("quantization_status", "compressed")
        if status != "compressed":
            raise ExportError(f"{path} holds float weights (quantization_status {status!r}), not "
                              "compressed ones; load it as a float model and quantize it with lowbit")
        groups = _groups(qc)
        tensors = _load_tensors(path)
        dtype = _float_dtype(tensors)
        prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")})
        layers = {}
        for name in prefixes:
            args = _scheme_for(name, groups, qc.get("ignore") or [])
            if args is None:
                raise ExportError(f"{path}: {name} has quantized tensors but no config group targets "
                                  "it as a linear layer; lowbit reads quantized linears only")
            parts = {k.rsplit(".", 1)[1]: tensors.pop(k) for k in list(tensors)
                     if k.rsplit(".", 1)[0] == name and k.rsplit(".", 1)[1].startswith("weight")}
            bias = tensors.pop(f"{name}.bias", None)
            try:
                qweight = from_compressed(parts, args, dtype)
            except (KeyError, ValueError, RuntimeError) as err:
                raise ExportError(f"{path}: cannot read quantized layer {name} ({err}); the "
                                  "checkpoint is corrupt or uses a layout lowbit does not read") from None
            layers[name] = QuantizedLinear(qweight, bias)
        if not layers:
            raise ExportError(f"{path} has a compressed-tensors config but no quantized weights")
        return assemble_model(path, layers, tensors, dtype=dtype, device=device)


def _untie(config_file: Path) -> None:
    """A quantized lm_head no longer shares the embedding's weight: say so in config.json, or
    transformers would tie the (float) embedding over it on load."""
    config = json.loads(config_file.read_text())
    for part in (config, config.get("text_config")):
        if isinstance(part, dict) and "tie_word_embeddings" in part:
            part["tie_word_embeddings"] = False
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def _groups(qc: dict) -> list[tuple[list[str], dict]]:
    """(targets, weights args) per config group; activation-quantized schemes are refused."""
    out = []
    for name, group in (qc.get("config_groups") or {}).items():
        if not isinstance(group, dict):
            raise ExportError(f"config group {name!r} is a preset name; lowbit reads written-out schemes")
        for field in ACTIVATION_FIELDS:
            if group.get(field):
                raise ExportError(f"config group {name!r} quantizes activations ({field}), which "
                                  "lowbit cannot run yet; read weight-only checkpoints (W4A16, W8A16)")
        weights = group.get("weights")
        if not weights:
            continue
        bits, typ = int(weights.get("num_bits", 8)), weights.get("type", "int")
        fmt = group.get("format") or qc.get("format")
        if typ == "int" and fmt == PACKED and bits not in PACKABLE_BITS:
            raise ExportError(f"config group {name!r} packs {bits}-bit codes, whose layout differs "
                              "between compressed-tensors releases; lowbit reads 2, 4 and 8 bits")
        out.append((list(group.get("targets") or []), weights))
    return out


def _scheme_for(name: str, groups, ignore: list[str]) -> dict | None:
    """The weights args whose targets match ``name``: exact names, then ``re:`` patterns, then
    the class name ``Linear`` (compressed-tensors' order); None when ignored or untargeted."""
    if any(_matches(name, p) for p in ignore):
        return None
    for rank in (0, 1, 2):
        for targets, args in groups:
            for t in targets:
                if (rank == 0 and t == name) or (rank == 1 and t.startswith("re:") and _matches(name, t)) or (
                        rank == 2 and t == "Linear"):
                    return args
    return None


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    tensors = {}
    for f in files:
        if not (folder / f).is_file():
            raise ExportError(f"{folder} lacks {f}; the checkpoint is incomplete")
        tensors.update(load_file(str(folder / f)))
    return tensors


def _float_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The most common float dtype among the tensors outside the quantized layers."""
    counts = Counter(t.dtype for k, t in tensors.items()
                     if t.dtype in FLOAT_DTYPES.values() and ".weight_" not in k)
    return counts.most_common(1)[0][0] if counts else torch.float32
