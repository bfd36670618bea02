"""Token sets: calibration windows drawn at seeded random offsets, and one evaluation stream.

Both tokenize a split's documents joined by a blank line, once, without special tokens
(so the result does not depend on whether a tokenizer adds BOS). Calibration follows GPTQ's
recipe (Frantar et al., 2022, arXiv:2210.17323): ``num_samples`` windows of ``seq_len`` tokens
starting at uniformly random offsets into the tokenized calibration text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lowbit import defaults
from lowbit.core.records import from_dict, to_dict
from lowbit.data.text import SPLITS, DataError, documents

log = logging.getLogger(__name__)

DOCUMENT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class CalibrationSpec:
    """Which calibration tokens to use; the same spec and tokenizer give the same tokens."""

    source: str = defaults.CALIBRATION_SOURCE
    """'wiki', 'lee', a .txt / .jsonl path, or a hub dataset id (see lowbit.data.text)."""
    num_samples: int = defaults.CALIBRATION_SAMPLES
    seq_len: int = defaults.CALIBRATION_SEQ_LEN
    seed: int = defaults.CALIBRATION_SEED
    split: str = "calibration"

    def __post_init__(self):
        for name in ("num_samples", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DataError(f"calibration {name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise DataError(f"calibration seed must be an integer, got {self.seed!r}")
        if self.split not in SPLITS:
            raise DataError(f"calibration split {self.split!r} is not one of {', '.join(SPLITS)}")

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationSpec:
        return from_dict(cls, data, "calibration")

    def to_dict(self) -> dict:
        return to_dict(self)


def tokenize_documents(docs: list[str], tokenizer) -> torch.Tensor:
    """One 1-D LongTensor: the documents joined by a blank line, without special tokens."""
    text = DOCUMENT_SEPARATOR.join(docs)
    # verbose=False: the whole text is longer than model_max_length on purpose.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_tokens(spec: CalibrationSpec, tokenizer) -> torch.Tensor:
    """``(num_samples, seq_len)`` token windows at random offsets drawn from ``spec.seed``."""
    stream = tokenize_documents(documents(spec.source, spec.split), tokenizer)
    n = stream.numel()
    if n < spec.seq_len:
        raise DataError(
            f"calibration text {spec.source!r} ({spec.split}) has {n} tokens, fewer than "
            f"seq_len={spec.seq_len}; lower seq_len or use a longer source"
        )
    if spec.num_samples * spec.seq_len > n:
        log.warning(
            "calibration asks for %d x %d tokens from %d; windows will overlap heavily",
            spec.num_samples, spec.seq_len, n,
        )
    generator = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, n - spec.seq_len + 1, (spec.num_samples,), generator=generator)
    offsets = starts[:, None] + torch.arange(spec.seq_len)
    return stream[offsets]


def evaluation_tokens(
    tokenizer, source: str = defaults.EVAL_SOURCE, max_tokens: int | None = None
) -> torch.Tensor:
    """``(1, n)``: the evaluation split of ``source`` as one token stream, cut to ``max_tokens``."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
        raise DataError(f"max_tokens must be an integer >= 2 or None, got {max_tokens!r}")
    stream = tokenize_documents(documents(source, "evaluation"), tokenizer)
    if stream.numel() < 2:
        raise DataError(f"evaluation text {source!r} has {stream.numel()} tokens; need at least 2")
    if max_tokens is not None:
        if stream.numel() < max_tokens:
            log.info("evaluation text %r has only %d tokens", source, stream.numel())
        stream = stream[:max_tokens]
    return stream[None, :]
