"""Log-likelihood of continuations, batched, with a shared context computed once.

A request is a pair (context, continuation). Its score is

    loglik = sum_j log p(c_j | x, c_<j)      greedy = all_j  c_j == argmax_v p(v | x, c_<j)

where x are the context tokens and c the continuation tokens. Tokens follow lm-eval's HFLM
convention, so that the numbers are comparable with published ones:

- trailing spaces of the context move to the front of the continuation;
- x = encode(context), c = encode(context + continuation)[len(x):] (the whole string is encoded
  once, so a word boundary tokenizes as it would in running text);
- an empty context is replaced by the end-of-text token;
- special tokens (BOS) are added only where HFLM adds them (:func:`add_bos`: Gemma);
- a request longer than the model's context keeps its last ``max_length + 1`` tokens.

Two batched schemes give the same numbers as scoring each request alone (to float rounding):

- **shared context** (requests with the same context, e.g. the options of a multiple-choice
  item): one forward of the contexts (left padded, explicit positions, only the last position's
  logits kept), then the options of each context attend to its key/value cache, repeated once per
  option; when every option is one token (the answer letters of MMLU), the context forward alone
  scores them all.
- **flat** (a context with a single continuation, e.g. LAMBADA, or WinoGrande's option contexts):
  each request as one left-padded sequence; only the last ``max(len(c))`` positions' logits are
  computed (``logits_to_keep``).

Memory: full-vocabulary rows are turned into log-probabilities only for the positions that
predict continuation tokens, in float32, and dropped at the end of each batch.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lowbit.errors import NonFiniteError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Encoded:
    """One request as token ids: ``context`` then ``continuation`` (never empty)."""

    index: int
    context: tuple[int, ...]
    continuation: tuple[int, ...]


def add_bos(tokenizer, model) -> bool:
    """Whether lowbit prepends special tokens (BOS) when encoding, as lm-eval's HFLM does:
    only for Gemma models, which were trained with a BOS token at the start of every text."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    return model_type.startswith("gemma")


def split_request(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's split: trailing spaces of the context belong to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_request(tokenizer, context: str, continuation: str, *, bos: bool) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one request, by the convention of this module."""
    context, continuation = split_request(context, continuation)

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=bos)["input_ids"])

    if context == "":
        eot = tokenizer.eos_token_id
        return [eot], encode(continuation)[int(bos and _starts_with_bos(tokenizer, encode(continuation))):]
    context_ids = encode(context)
    whole = encode(context + continuation)
    return context_ids, whole[len(context_ids):]


def _starts_with_bos(tokenizer, ids: list[int]) -> bool:
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def max_length(model) -> int:
    """The longest input the model takes (its position table), 2048 when the config says nothing."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 8,
                   progress: bool = False) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding reproduces the continuation) for
    each (context, continuation) request, in the order given."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    bos = add_bos(tokenizer, model)
    limit = max_length(model)
    encoded = []
    for i, (context, continuation) in enumerate(requests):
        x, c = encode_request(tokenizer, context, continuation, bos=bos)
        if not c:
            raise ValueError(f"request {i}: the continuation {continuation!r} encodes to no tokens")
        encoded.append(_Encoded(i, tuple(x), tuple(c)))
    # Requests with the same context tokens share one context forward (when nothing is cut).
    groups: dict[tuple[int, ...], list[_Encoded]] = {}
    for e in encoded:
        groups.setdefault(e.context, []).append(e)
    shared, flat = [], []
    for members in groups.values():
        fits = all(len(e.context) + len(e.continuation) <= limit + 1 for e in members)
        (shared if len(members) > 1 and fits else flat).append(members)
    flat_requests = [e for members in flat for e in members]
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    device = next(model.parameters()).device
    bar = tqdm(total=len(requests), desc="log-likelihoods", disable=not progress, leave=False)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # Longest first (as lm-eval): the first batch shows the peak memory at once.
            shared.sort(key=lambda m: -(len(m[0].context) + max(len(e.continuation) for e in m)))
            for start in range(0, len(shared), batch_size):
                batch = shared[start:start + batch_size]
                for e, score in _score_shared(model, batch, device, batch_size):
                    results[e.index] = score
                bar.update(sum(len(m) for m in batch))
            flat_requests.sort(key=lambda e: -(len(e.context) + len(e.continuation)))
            for start in range(0, len(flat_requests), batch_size):
                batch = flat_requests[start:start + batch_size]
                for e, score in zip(batch, _score_flat(model, batch, device, limit)):
                    results[e.index] = score
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


def _cache_kwarg(model) -> str:
    """The name under which this transformers version passes a KV cache to forward()."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _left_pad(rows: list[tuple[int, ...]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) with the rows right-aligned; pad positions have mask 0."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (left padding does not shift positions)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _check_finite(logp: torch.Tensor) -> None:
    if not torch.isfinite(logp).all():
        raise NonFiniteError("the model's logits hold NaN or Inf on a scored position; the model is broken "
                             "(check its weights with `lowbit eval` against the float model)")


def _score_tokens(logp: torch.Tensor, targets: torch.Tensor) -> tuple[float, bool]:
    """logp (n, V) log-probabilities at the n positions predicting ``targets`` (n,)."""
    _check_finite(logp)
    total = logp.gather(-1, targets[:, None]).sum().item()
    greedy = bool((logp.argmax(-1) == targets).all().item())
    return float(total), greedy


def _score_flat(model, batch: list[_Encoded], device, limit: int) -> list[tuple[float, bool]]:
    """Each request as one sequence ``(x + c)[:-1]``, the last ``limit`` tokens at most."""
    rows = [(e.context + e.continuation)[-(limit + 1):][:-1] for e in batch]
    ids, mask = _left_pad(rows, _pad_id(model), device)
    keep = max(len(e.continuation) for e in batch)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                   logits_to_keep=keep).logits[:, -keep:]
    out = []
    for i, e in enumerate(batch):
        n = len(e.continuation)
        logp = torch.log_softmax(logits[i, keep - n:].float(), dim=-1)
        out.append(_score_tokens(logp, torch.tensor(e.continuation, device=device)))
    del logits
    return out


def _score_shared(model, groups: list[list[_Encoded]], device, batch_size: int):
    """One forward of the shared contexts; the options of each context continue its KV cache."""
    contexts = [m[0].context for m in groups]
    ids, mask = _left_pad(contexts, _pad_id(model), device)
    single_token = all(len(e.continuation) == 1 for m in groups for e in m)
    name = _cache_kwarg(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=not single_token,
                logits_to_keep=1)
    last = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each option's first token
    _check_finite(last)
    scored = []
    if single_token:
        for g, members in enumerate(groups):
            for e in members:
                tok = e.continuation[0]
                scored.append((e, (last[g, tok].item(), bool(last[g].argmax().item() == tok))))
        return scored
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    del out
    options = [(g, e) for g, members in enumerate(groups) for e in members]
    context_len = mask.sum(-1)
    pad_id = _pad_id(model)
    for start in range(0, len(options), batch_size):
        chunk = options[start:start + batch_size]
        rows = torch.tensor([g for g, _ in chunk], device=device)
        width = max(len(e.continuation) for _, e in chunk) - 1
        if width == 0:  # every option in this chunk is one token: the context row scores it
            for g, e in chunk:
                tok = e.continuation[0]
                scored.append((e, (last[g, tok].item(), bool(last[g].argmax().item() == tok))))
            continue
        # The option forward feeds c[:-1]; its logits predict c[1:]. Options are right padded.
        opt_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        opt_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (_, e) in enumerate(chunk):
            n = len(e.continuation) - 1
            if n:
                opt_ids[i, :n] = torch.tensor(e.continuation[:-1])
                opt_mask[i, :n] = 1
        opt_ids, opt_mask = opt_ids.to(device), opt_mask.to(device)
        chunk_cache = _select(cache, rows)
        positions = context_len[rows][:, None] + torch.arange(width, device=device)[None, :]
        logits = model(input_ids=opt_ids, attention_mask=torch.cat([mask[rows], opt_mask], dim=1),
                       position_ids=positions, use_cache=True, **{name: chunk_cache}).logits
        for i, (g, e) in enumerate(chunk):
            n = len(e.continuation) - 1
            logp = torch.cat([last[g:g + 1], torch.log_softmax(logits[i, :n].float(), dim=-1)])
            scored.append((e, _score_tokens(logp, torch.tensor(e.continuation, device=device))))
        del logits, chunk_cache
    return scored


def _select(cache, rows: torch.Tensor):
    """A copy of ``cache`` holding the batch rows ``rows`` (repeats allowed); ``cache`` is kept."""
    # The cached tensors are shared, not copied: selecting replaces them with new tensors in the
    # copy's layers only, and the option forward grows those by concatenation.
    memo = {id(t): t for layer in getattr(cache, "layers", ()) for t in vars(layer).values()
            if isinstance(t, torch.Tensor)}
    chunk = copy.deepcopy(cache, memo)
    chunk.batch_select_indices(rows)
    return chunk


def _pad_id(model) -> int:
    """Any valid token id: padded positions are masked out and never scored."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None)
    if isinstance(pad, list):
        pad = pad[0]
    return int(pad or 0)


def loglikelihood_reference(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """The slow reference: one request, one unpadded forward of ``(x + c)[:-1]``, full logits."""
    bos = add_bos(tokenizer, model)
    x, c = encode_request(tokenizer, context, continuation, bos=bos)
    tokens = (x + c)[-(max_length(model) + 1):]
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([tokens[:-1]], device=device)).logits[0]
    logp = torch.log_softmax(logits[-len(c):].float(), dim=-1)
    return _score_tokens(logp, torch.tensor(c, device=device))
