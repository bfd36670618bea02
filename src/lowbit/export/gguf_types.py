"""llama.cpp's file types and which block type each tensor gets: the rules of its quantizer
(``llama_tensor_get_type`` in llama.cpp's src/llama-quant.cpp), restated as data and small
functions so that lowbit quantizes every linear on the grid the GGUF file will hold.

A file type (``Q4_K_M``) names a base block type (Q4_K) and per-tensor exceptions:

- the output matrix (and the token embeddings when the model ties them): Q6_K, or Q8_0 when the
  row length is not a multiple of the type's block; Q8_0 files keep Q8_0;
- ``attn_v`` and ``ffn_down`` of the layers ``use_more_bits`` picks (the first and last eighth,
  and every third layer between): Q6_K in Q4_K_M / Q5_K_M; Q3_K_M / Q3_K_L / Q4_K_S / Q2_K have
  their own rules (below); ``attn_output``: Q4_K in Q3_K_M, Q5_K in Q3_K_L, Q3_K in Q2_K;
- a k-quant on a row length that is not a multiple of 256 falls back: Q2_K, Q3_K -> IQ4_NL,
  Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (then F16 when even 32 does not divide it).

Only the dense-model rules are restated (no mixture-of-experts, Falcon or 70B special cases), and
not the ``imatrix``-dependent ones (Q4_0 / Q5_0 files with an importance matrix move the first
ffn_down layers to Q4_1 / Q5_1).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from lowbit.export.base import ExportError

BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32,
         "IQ4_NL": 32, "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
"""Row elements per block of each block type."""

FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

FILE_TYPES = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1",
    "Q5_0": "Q5_0", "Q5_1": "Q5_1", "IQ4_NL": "IQ4_NL", "Q2_K": "Q2_K", "Q3_K_S": "Q3_K",
    "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K",
    "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
}
"""File type -> its base block type."""

_FTYPE_ENUM = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}


def file_type_id(file_type: str) -> int:
    """``general.file_type`` (llama.cpp's ``llama_ftype``) of a file type."""
    return int(gguf.LlamaFileType[_FTYPE_ENUM.get(file_type, "MOSTLY_" + file_type)])


def canonical_file_type(name: str) -> str:
    key = name.strip().upper()
    if key not in FILE_TYPES:
        raise ExportError(f"unknown GGUF file type {name!r}; available: {', '.join(FILE_TYPES)}")
    return key


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class TensorChoice:
    type: str
    """The block type written."""
    asked: str
    """The type the file type's rules chose before any fallback."""
    reason: str = ""
    """Why ``type`` differs from ``asked`` (empty when it does not)."""


def tensor_type(file_type: str, role: str, i_layer: int, n_layers: int, row_length: int) -> TensorChoice:
    """The block type of one tensor in a file of ``file_type``.

    role: the GGUF tensor kind without block prefix and suffix (``attn_v``, ``ffn_down``,
    ``attn_output``, ``output`` (also the tied token embeddings), ``token_embd``, ...).
    """
    base = FILE_TYPES[canonical_file_type(file_type)]
    t = base
    if base in ("F32", "F16", "BF16"):
        return TensorChoice(base, base)
    if role == "output":
        if row_length % BLOCK[base]:
            return TensorChoice("Q8_0", "Q8_0")
        t = base if base == "Q8_0" else "Q6_K"
    elif role == "attn_v":
        if file_type == "Q2_K":
            t = "Q3_K"
        elif file_type == "Q3_K_M":
            t = "Q5_K" if i_layer < 2 else "Q4_K"
        elif file_type == "Q3_K_L":
            t = "Q5_K"
        elif file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_layer, n_layers):
            t = "Q6_K"
        elif file_type == "Q4_K_S" and i_layer < 4:
            t = "Q5_K"
    elif role == "ffn_down":
        if file_type == "Q2_K":
            t = "Q3_K"
        elif file_type == "Q3_K_M":
            t = "Q5_K" if i_layer < n_layers // 16 else "Q4_K"
        elif file_type == "Q3_K_L":
            t = "Q5_K"
        elif file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_layer, n_layers):
            t = "Q6_K"
        elif file_type == "Q4_K_S" and i_layer < n_layers // 8:
            t = "Q5_K"
    elif role == "attn_output":
        t = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(file_type, t)
    return fit_row(t, row_length)


def fit_row(t: str, row_length: int) -> TensorChoice:
    """``t``, or llama.cpp's fallback when ``row_length`` is not a multiple of its block."""
    if row_length % BLOCK[t] == 0:
        return TensorChoice(t, t)
    f = FALLBACK.get(t, "F16")
    if row_length % BLOCK[f]:
        f = "F16"
    return TensorChoice(f, t, f"{row_length} columns are not a multiple of {BLOCK[t]}")


def tensor_role(gguf_name: str) -> tuple[str, int]:
    """(role, layer index or -1) of a GGUF tensor name such as ``blk.3.attn_v.weight``."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return parts[2], int(parts[1])
    return parts[0], -1
