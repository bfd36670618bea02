"""Text sources, deterministic calibration / evaluation splits, and token sets."""

from lowbit.data.calibration import CalibrationSpec, calibration_tokens, evaluation_tokens, tokenize_documents
from lowbit.data.text import BUNDLED, SPLITS, DataError, documents, strip_wiki_markup

__all__ = [
    "BUNDLED",
    "SPLITS",
    "CalibrationSpec",
    "DataError",
    "calibration_tokens",
    "documents",
    "evaluation_tokens",
    "strip_wiki_markup",
    "tokenize_documents",
]
