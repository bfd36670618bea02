"""What every export format shares: the ``Exporter`` record, the registry, the report, and the
atomic write of a folder or a file.

An exporter is one class per format (``lowbit.export.<format>``) with

- ``name`` (``compressed-tensors``, ``gguf``, ...) and ``writes`` (``"folder"`` or ``"file"``);
- ``supports(qweight, variant) -> str | None``: None when the format can hold this quantized
  weight exactly as lowbit computed it (or with a loss the report names), otherwise the reason
  and the nearest scheme that works;
- ``write(model, tokenizer, out, variant) -> ExportReport``: writes into ``out`` (a temporary
  folder, or a temporary file path) from the model's ``QuantizedLinear`` layers, through the
  format module's pure repacking functions;
- optionally ``recognizes(path)`` and ``read(path)``: import a checkpoint of this format back
  into a lowbit model (``QuantizedLinear`` layers holding the same codes), so that ``lowbit
  eval`` scores any checkpoint and round trips can be checked.

``export`` checks every layer first (one line naming the first layer that cannot be written,
and how many), then writes atomically: a failed or interrupted export leaves nothing that looks
complete (``lowbit.outputs``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from lowbit.core.registry import Registry
from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import LowbitError, OutputError
from lowbit.nn.linear import QuantizedLinear
from lowbit.outputs import (
    EXPORT_MARKER,
    PARTIAL_MARKER,
    check_output,
    describe_os_error,
    fsync_files,
    replace_folder,
    signals_deferred,
    sweep_stale,
    temp_folder,
)


class ExportError(LowbitError):
    """A model cannot be written in the requested format (the message names the fix)."""


@dataclass
class ExportReport:
    format: str
    """The target as asked, e.g. ``compressed-tensors`` or ``gguf:Q4_K_M``."""
    out: str = ""
    bits_per_weight: float = 0.0
    """Over the quantized linears as written (scales, zero points, fallbacks included)."""
    layers: dict[str, str] = field(default_factory=dict)
    """Linear name -> how it was written (e.g. ``pack-quantized int4 group 32``, ``Q5_0``)."""
    fallbacks: list[str] = field(default_factory=list)
    """Tensors written in another type than asked, each with the reason."""
    lossy: list[str] = field(default_factory=list)
    """Conversions that changed values (e.g. Q4_1's offset rounded to float16), with the size."""
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Exporter:
    """Base class of one export format; see the module docstring."""

    name: ClassVar[str]
    writes: ClassVar[str] = "folder"
    variants: ClassVar[tuple[str, ...]] = ()
    """Allowed ``FORMAT:VARIANT`` values (empty: the format takes no variant)."""

    def check_variant(self, variant: str | None) -> str | None:
        if not self.variants:
            if variant:
                raise ExportError(f"format {self.name!r} takes no variant; write --format {self.name}")
            return None
        if variant is None:
            return self.variants[0]
        for v in self.variants:
            if v.lower() == variant.lower():
                return v
        raise ExportError(f"unknown {self.name} type {variant!r}; available: {', '.join(self.variants)}")

    def supports(self, qweight: QuantizedTensor, variant: str | None) -> str | None:
        raise NotImplementedError

    def writes_float(self, variant: str | None) -> bool:
        """Whether this target writes a float model (no quantized linears needed)."""
        return False

    def write(self, model: nn.Module, tokenizer, out: Path, variant: str | None) -> ExportReport:
        raise NotImplementedError

    def recognizes(self, path: Path) -> bool:
        return False

    def read(self, path: Path, device="cpu"):
        """(model with QuantizedLinear layers, tokenizer) from a checkpoint of this format."""
        raise ExportError(f"lowbit cannot read {self.name} checkpoints yet")


EXPORTERS: Registry[Exporter] = Registry("export format")


def register_exporter(cls: type[Exporter]) -> type[Exporter]:
    EXPORTERS.add(cls.name, cls())
    return cls


def parse_target(target: str) -> tuple[Exporter, str | None]:
    """``FORMAT`` or ``FORMAT:VARIANT`` -> (exporter, canonical variant)."""
    name, _, variant = target.strip().partition(":")
    exporter = EXPORTERS.get(name.lower())
    return exporter, exporter.check_variant(variant or None)


def quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def check_exportable(model: nn.Module, exporter: Exporter, variant: str | None) -> None:
    """Every quantized linear must fit the format; one line naming the first that does not."""
    layers = quantized_linears(model)
    if not layers and not exporter.writes_float(variant):
        raise ExportError("the model has no quantized linears: quantize it first with `lowbit quantize`")

    def reason(qweight) -> str | None:
        if qweight.two_level and exporter.name != "gguf":
            return "two-level (k-quant) scales are written only as GGUF: use --format gguf"
        return exporter.supports(qweight, variant)

    problems = [(n, r) for n, m in layers.items() if (r := reason(m.qweight))]
    if problems:
        name, reason = problems[0]
        more = f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""
        target = exporter.name + (f":{variant}" if variant else "")
        raise ExportError(f"cannot write {name} as {target}{more}: {reason}")


def export(model: nn.Module, tokenizer, target: str, out: str | os.PathLike, *, overwrite: bool = False,
           sources=(), source_gguf: str | os.PathLike | None = None) -> ExportReport:
    """Write ``model`` (lowbit-quantized) in format ``target`` to ``out``, atomically.

    source_gguf: the original model's GGUF file, whose header the GGUF export copies."""
    exporter, variant = parse_target(target)
    check_exportable(model, exporter, variant)
    out = check_output(out, overwrite=overwrite, sources=sources, kind=exporter.writes)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out.parent)
    tmp = temp_folder(out.parent, out.name)
    try:
        target_path = tmp if exporter.writes == "folder" else tmp / out.name
        if exporter.name == "gguf":
            report = exporter.write(model, tokenizer, target_path, variant, source=source_gguf)
        else:
            report = exporter.write(model, tokenizer, target_path, variant)
        report.format = exporter.name + (f":{variant}" if variant else "")
        report.out = str(out)
        if exporter.writes == "folder":
            (tmp / EXPORT_MARKER).write_text(json.dumps(report.to_dict(), indent=2))
            (tmp / PARTIAL_MARKER).unlink()
            fsync_files(tmp)
            replace_folder(tmp, out)
        else:
            fsync_files(tmp)
            with signals_deferred():
                os.replace(target_path, out)
    except OSError as err:
        raise OutputError(f"cannot write output {out}: {describe_os_error(err, out.parent)}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report


# -- helpers for formats written as Hugging Face folders -------------------------------------


def float_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors outside the quantized linears (embeddings, norms, biases, a float
    lm_head), without tied duplicates, as a Hugging Face checkpoint stores them."""
    layers = quantized_linears(model)
    skip = {f"{n}.{k}" for n in layers for k in QuantizedTensor.STORED_FIELDS}
    out, seen = {}, set()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        if name in skip or (tied and name == "lm_head.weight"):
            continue
        key = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def write_hf_folder(folder: Path, model: nn.Module, tokenizer, tensors: dict[str, torch.Tensor],
                    quantization_config: dict | None) -> list[str]:
    """config.json (with ``quantization_config``), model.safetensors (sharded above 4 GiB),
    generation config and tokenizer files; returns the file names written."""
    from lowbit.io import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder, tensors)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return sorted(p.name for p in folder.iterdir() if p.name != PARTIAL_MARKER)


def bits_per_weight(nbytes: int, numel: int) -> float:
    return 8.0 * nbytes / max(1, numel)


def assemble_model(folder: Path, layers: dict[str, QuantizedLinear], tensors: dict[str, torch.Tensor],
                   dtype: torch.dtype = torch.float32, device="cpu"):
    """A model of ``folder``'s config.json (its quantization_config ignored) whose linears
    ``layers`` are the given QuantizedLinear modules and whose other parameters and buffers are
    ``tensors`` (missing or unexpected names are refused); returns (model, tokenizer or None)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.load import has_tokenizer
    from lowbit.pipeline.lazy import tie_embeddings, tied_parameters

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    expected = {n for n, _ in model.named_parameters()} - set(tied_parameters(model))
    expected -= {f"{n}.bias" for n, m in layers.items() if m.bias is not None}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - {n for n, _ in model.named_parameters()}
                        - {n for n, _ in model.named_buffers()})
    if missing or unexpected:
        raise ExportError(f"{folder}: the checkpoint does not fit its config (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}); it is not a complete model")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                          strict=False, assign=True)
    tie_embeddings(model)
    model.eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer(folder) else None
    return model, tokenizer


def read_checkpoint(path: str | os.PathLike, device="cpu"):
    """(model, tokenizer, format name) for a checkpoint some registered format recognizes, or
    None when none does (a lowbit folder or a float model is read elsewhere)."""
    path = Path(path)
    for exporter in EXPORTERS.values():
        if exporter.recognizes(path):
            model, tokenizer = exporter.read(path, device=device)
            return model, tokenizer, exporter.name
    return None


# -- int32 words, as compressed-tensors, GPTQ and AWQ store codes --------------------------------


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned b-bit codes (..., K) -> int32 words (..., ceil(K*b/32)): one bit stream per
    row, code k at bits [k*b, (k+1)*b) (a code may straddle two words when b does not divide 32)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, k = codes.shape
    c = codes.to(torch.int64)
    c = torch.nn.functional.pad(c, (0, (-k) % 32)).reshape(*lead, -1, 32)
    start = torch.arange(32, dtype=torch.int64, device=c.device) * bits
    word, offset = start // 32, start % 32
    words = torch.zeros(*c.shape[:-1], bits, dtype=torch.int64, device=c.device)
    words.index_add_(-1, word, (c << offset) & 0xFFFFFFFF)  # disjoint bits: add == or
    spill = offset + bits > 32
    if spill.any():
        words.index_add_(-1, word[spill] + 1, c[..., spill] >> (32 - offset[spill]))
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement
    return words.reshape(*lead, -1)[..., : -(-k * bits // 32)].to(torch.int32)


def unpack_int32(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: int32 words -> unsigned codes (..., k) as int16."""
    *lead, n = words.shape
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, (-n) % bits)).reshape(*lead, -1, bits)
    start = torch.arange(32, dtype=torch.int64, device=w.device) * bits
    word, offset = start // 32, start % 32
    c = w[..., word] >> offset
    spill = offset + bits > 32
    if spill.any():
        c[..., spill] |= w[..., word[spill] + 1] << (32 - offset[spill])
    c = c & ((1 << bits) - 1)
    return c.reshape(*lead, -1)[..., :k].to(torch.int16)
