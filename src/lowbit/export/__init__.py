"""Export lowbit models to the formats other engines load, and read those formats back.

One module per format, each registering an ``Exporter`` (``lowbit.export.base``):
``compressed_tensors`` (vLLM, transformers), ``gptq``, ``awq``, ``bitsandbytes``
(transformers' ``BitsAndBytesConfig``) and ``gguf`` (llama.cpp).
"""

from lowbit.export import awq, bitsandbytes, compressed_tensors, gguf, gptq  # noqa: F401  (register)
from lowbit.export.base import (
    EXPORTERS,
    Exporter,
    ExportError,
    ExportReport,
    check_exportable,
    export,
    parse_target,
    read_checkpoint,
)

__all__ = [
    "EXPORTERS", "ExportError", "ExportReport", "Exporter", "check_exportable", "export", "parse_target",
    "read_checkpoint",
]
