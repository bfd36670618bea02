"""Fidelity of a (quantized) model: sliding-window perplexity and next-token KL divergence.

Windows. The token stream is cut into windows of ``window`` tokens starting every ``stride``
tokens. Each token is scored at most once: window ``k`` scores the targets after the previous
window's end, so with ``stride < window`` its first ``window - stride`` tokens are context only;
with ``stride == window`` the windows are disjoint and each window's first token is context only
(it has nothing before it), as in GPTQ's wikitext-2 evaluation. Token 0 is never scored.

Metrics, over the scored positions t (N of them), with p = reference, q = model:

- perplexity: exp(-1/N * sum_t log q(x_t | x_<t)).
- mean KL: 1/N * sum_t KL(p_t || q_t), KL(p || q) = sum_v p(v) (log p(v) - log q(v)), from
  float32 log-softmax; the 99th percentile of the per-position KL shows the tail.
- top-1 agreement: fraction of positions where argmax_v q_t(v) == argmax_v p_t(v).

A model whose logits hold NaN or Inf on any scored window raises NonFiniteError: a perplexity of
``nan`` is never reported as a result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lowbit import defaults
from lowbit.core.records import to_dict
from lowbit.errors import ConfigError, NonFiniteError

log = logging.getLogger(__name__)

ROWS_PER_CHUNK = 128
"""Positions per log-softmax chunk: bounds float32 temporaries to 128 x vocab per tensor."""


@dataclass(frozen=True)
class Window:
    """One forward pass: ``input_ids`` (1, L); targets ``input_ids[:, score_from:]`` are scored."""

    input_ids: torch.Tensor
    score_from: int


def windows(
    tokens: torch.Tensor, window: int = defaults.EVAL_WINDOW, stride: int | None = None
) -> Iterator[Window]:
    """The windows over ``tokens`` ((n,) or (1, n)) with the scoring rule of this module;
    ``stride`` defaults to ``window`` (disjoint windows)."""
    stream = _as_stream(tokens)
    stride = _check_window(window, stride)
    n, scored_until, begin = stream.numel(), 1, 0
    while scored_until < n:
        end = min(begin + window, n)
        score_from = max(scored_until, begin + 1)
        yield Window(stream[begin:end][None, :], score_from - begin)
        scored_until, begin = end, begin + stride


def count_windows(n: int, window: int, stride: int) -> int:
    """How many windows :func:`windows` yields over ``n`` tokens (for progress bars)."""
    if n < 2:
        return 0
    if n <= window:
        return 1
    return 1 + math.ceil((n - window) / stride)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    """Mean negative log-likelihood per scored token, in nats."""
    num_scored: int


@dataclass(frozen=True)
class FidelityReport:
    """How far ``model`` is from ``reference`` on the same token windows."""

    perplexity: float
    reference_perplexity: float
    perplexity_change_pct: float
    """100 * (perplexity / reference_perplexity - 1)."""
    mean_kl: float
    """Mean over scored positions of KL(P_reference || P_model), in nats."""
    p99_kl: float
    """99th percentile of the per-position KL (linear interpolation)."""
    top1_agreement: float
    num_scored: int
    window: int
    stride: int

    def to_dict(self) -> dict:
        return to_dict(self)


@torch.inference_mode()
def perplexity(
    model, tokens: torch.Tensor, window: int = defaults.EVAL_WINDOW, stride: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Token-level perplexity of ``model`` on ``tokens`` with sliding windows (module docstring)."""
    stride = _check_window(window, stride)
    _check_model(model, window)
    nll_sums, count = [], 0  # sums stay on the model's device: no host sync per window
    for number, win in enumerate(_progress(tokens, window, stride, progress, "perplexity")):
        logits = _score_logits(model, win, "the model", number)
        targets = win.input_ids[0, win.score_from:].to(logits.device)
        for rows in _chunks(logits.shape[0]):
            nll_sums.append(_target_nll(torch.log_softmax(logits[rows].float(), -1), targets[rows]))
        count += targets.numel()
    mean_nll = float(_total(nll_sums)) / count
    return PerplexityResult(math.exp(mean_nll), mean_nll, count)


@torch.inference_mode()
def compare_models(
    model, reference, tokens: torch.Tensor, window: int = defaults.EVAL_WINDOW, stride: int | None = None,
    progress: bool = True,
) -> FidelityReport:
    """Perplexity of both models, KL(P_reference || P_model) and top-1 agreement, window by window.

    The two models may sit on different devices; per-window statistics are computed on the
    reference's device and only the per-position KL values (one float each) are kept.
    """
    stride = _check_window(window, stride)
    _check_model(model, window)
    _check_model(reference, window)
    model_vocab, ref_vocab = _vocab_size(model), _vocab_size(reference)
    if model_vocab is not None and ref_vocab is not None and model_vocab != ref_vocab:
        raise ConfigError(
            f"vocabulary sizes differ (model {model_vocab}, reference {ref_vocab}); "
            "compare models that share a tokenizer"
        )
    nll_model, nll_ref, agree, kl_parts = [], [], [], []
    for number, win in enumerate(_progress(tokens, window, stride, progress, "fidelity")):
        ref_logits = _score_logits(reference, win, "the reference", number)
        logits = _score_logits(model, win, "the model", number).to(ref_logits.device)
        if logits.shape[-1] != ref_logits.shape[-1]:
            raise ConfigError(
                f"logit widths differ (model {logits.shape[-1]}, "
                f"reference {ref_logits.shape[-1]}); "
                "compare models that share a tokenizer"
            )
        targets = win.input_ids[0, win.score_from:].to(ref_logits.device)
        for rows in _chunks(logits.shape[0]):
            logq = torch.log_softmax(logits[rows].float(), dim=-1)
            logp = torch.log_softmax(ref_logits[rows].float(), dim=-1)
            kl_parts.append(_kl_rows(logp, logq).double())
            nll_model.append(_target_nll(logq, targets[rows]))
            nll_ref.append(_target_nll(logp, targets[rows]))
            agree.append((logq.argmax(-1) == logp.argmax(-1)).sum())
    kl = torch.cat(kl_parts).cpu()
    count = kl.numel()
    ppl = math.exp(float(_total(nll_model)) / count)
    ref_ppl = math.exp(float(_total(nll_ref)) / count)
    return FidelityReport(
        perplexity=ppl,
        reference_perplexity=ref_ppl,
        perplexity_change_pct=100.0 * (ppl / ref_ppl - 1.0),
        mean_kl=float(kl.mean()),
        p99_kl=quantile(kl, 0.99),
        top1_agreement=int(_total(agree)) / count,
        num_scored=count,
        window=window,
        stride=stride,
    )


def _target_nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-probability of ``targets`` (S,) under ``logp`` (S, V), in float64."""
    return -logp.gather(-1, targets[:, None]).double().sum()


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(parts).sum()


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities; terms with p(v) = 0 contribute 0 (not nan)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def quantile(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of a 1-D tensor with linear interpolation (torch.quantile's default),
    without torch.quantile's limit of 2**24 elements."""
    ordered = values.flatten().double().sort().values
    pos = q * (ordered.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, ordered.numel() - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def _score_logits(model, win: Window, who: str = "the model", number: int = 0) -> torch.Tensor:
    """Logits predicting the scored targets: positions score_from-1 .. L-2 of the window, (S, V);
    NonFiniteError if any is NaN or Inf."""
    ids = win.input_ids.to(_device(model))
    logits = model(input_ids=ids, use_cache=False).logits[0, win.score_from - 1 : -1]
    if not bool(torch.isfinite(logits).all()):
        kind = "NaN" if bool(logits.isnan().any()) else "Inf"
        raise NonFiniteError(
            f"{who} yields {kind} logits (window {number + 1}): its weights hold NaN/Inf or its "
            "activations overflow its dtype; no score is meaningful"
        )
    return logits


def _progress(tokens, window: int, stride: int, progress: bool, desc: str):
    stream = _as_stream(tokens)
    if stream.numel() < 2:
        raise ConfigError(f"need at least 2 tokens to score, got {stream.numel()}")
    total = count_windows(stream.numel(), window, stride)
    return tqdm(windows(stream, window, stride), total=total, desc=desc, unit="window",
                disable=not progress)


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, ROWS_PER_CHUNK):
        yield slice(start, min(start + ROWS_PER_CHUNK, n))


def _as_stream(tokens: torch.Tensor) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int32):
        raise ConfigError("tokens must be an integer tensor of shape (n,) or (1, n)")
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        return tokens[0].long()
    if tokens.dim() == 1:
        return tokens.long()
    raise ConfigError(
        f"tokens must have shape (n,) or (1, n), got {tuple(tokens.shape)}; "
        "concatenate the text into one stream"
    )


CONFIG_FIELDS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "rope_theta", "tie_word_embeddings", "sliding_window",
    "layer_types", "hidden_act",
)
"""Config fields that a quantized model shares with the model it was made from."""


def config_differences(model, reference) -> list[str]:
    """The architecture fields (``CONFIG_FIELDS``) in which two models' configs differ, as
    ``"field model-value vs reference-value"``; empty for a model and its quantized copy."""
    configs = []
    for m in (model, reference):
        config = getattr(m, "config", None)
        if config is not None:  # multimodal configs keep the text model's fields on a sub-config
            config = getattr(config, "get_text_config", lambda c=config: c)()
        configs.append(config)
    if any(c is None for c in configs):
        return []
    out = []
    for name in CONFIG_FIELDS:
        a, b = (getattr(c, name, None) for c in configs)
        if isinstance(a, tuple):
            a = list(a)
        if isinstance(b, tuple):
            b = list(b)
        if a != b:
            out.append(f"{name} {a} vs {b}")
    return out


def check_window(window: int, stride: int | None) -> int:
    """The stride to use (``window`` when None), after checking both (ConfigError)."""
    return _check_window(window, stride)


def _check_window(window: int, stride: int | None) -> int:
    """The stride to use (``window`` when None), after checking both."""
    if window < 2:
        raise ConfigError(f"window must be >= 2 tokens, got {window}")
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise ConfigError(f"stride must be between 1 and window ({window}), got {stride}")
    return stride


def _check_model(model, window: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and window > limit:
        raise ConfigError(f"window {window} exceeds the model's {limit} positions; lower window")
    if getattr(model, "training", False):
        log.warning("model is in training mode (dropout on); call model.eval() for stable scores")


def _vocab_size(model) -> int | None:
    config = getattr(model, "config", None)
    # Multimodal configs keep the vocabulary on the text sub-config.
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    size = getattr(config, "vocab_size", None)
    return size if isinstance(size, int) else None


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
