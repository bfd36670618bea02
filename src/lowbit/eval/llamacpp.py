"""Score a GGUF file as llama.cpp runs it (its kernels, which also quantize activations), through
the ``xllamacpp`` wheel (llama.cpp built for CPU, in process; ``pip install xllamacpp``).

llama.cpp's server returns the top-k log-probabilities of each next token, not the whole
distribution, so the comparison is over the top-k set: at every position, both distributions are
restricted to llama.cpp's k most likely tokens and renormalised, and

    top-k KL  = sum_{t in top-k} p_ref(t) log(p_ref(t) / p_llama(t))     (renormalised)
    top-1     = llama.cpp's most likely token equals the reference's

Positions are teacher-forced: the prompt is the first i tokens (as ids, so no tokenizer
differences), one token is predicted, and llama.cpp's prompt cache makes each step one new token.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError


@dataclass
class RuntimeComparison:
    positions: int
    k: int
    top_k_kl: float
    """Mean over positions of the renormalised top-k KL(reference || llama.cpp)."""
    top1_agreement: float
    max_logprob_gap: float
    """Largest |log p_ref - log p_llama| over the top-k tokens after removing each position's
    mean offset (llama.cpp may normalise over fewer candidates)."""

    def to_dict(self) -> dict:
        return dict(vars(self))


@contextlib.contextmanager
def llamacpp_server(gguf_path: str | os.PathLike, n_ctx: int = 2048, threads: int | None = None):
    """An in-process llama.cpp server for ``gguf_path``."""
    try:
        import xllamacpp
    except ImportError:
        raise LowbitError("llama.cpp runtime scoring needs the xllamacpp wheel: pip install xllamacpp") from None
    params = xllamacpp.CommonParams()
    params.model.path = str(Path(gguf_path))
    params.n_ctx = n_ctx
    params.cpuparams.n_threads = threads or max(1, min(4, os.cpu_count() or 1))
    try:
        server = xllamacpp.Server(params)
    except Exception as err:  # the binding raises RuntimeError-like errors for a bad file
        raise LowbitError(f"llama.cpp cannot load {gguf_path}: {err}") from None
    try:
        yield server
    finally:
        del server


def top_logprobs(server, ids: list[int], k: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each position i < len(ids) - 1: llama.cpp's top-k (token ids, log-probabilities) of
    the token after ``ids[: i + 1]``."""
    out = []
    for i in range(len(ids) - 1):
        r = server.handle_completions({"prompt": ids[: i + 1], "n_predict": 1, "temperature": 0,
                                       "n_probs": k, "cache_prompt": True})
        if "error" in r:
            raise LowbitError(f"llama.cpp: {r['error']}")
        top = r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        out.append((torch.tensor([t["id"] for t in top]), torch.tensor([t["logprob"] for t in top])))
    return out


def compare_with_llamacpp(server, reference_logprobs: torch.Tensor, ids: list[int], k: int = 10) -> RuntimeComparison:
    """Compare llama.cpp's next-token top-k with ``reference_logprobs`` ((len(ids), vocab)
    log-softmax of a model run on ``ids``)."""
    kls, agree, gap = [], 0, 0.0
    for i, (tids, tl) in enumerate(top_logprobs(server, ids, k)):
        ref = reference_logprobs[i, tids].float()
        p_ref = torch.softmax(ref, 0)
        p_cpp = torch.softmax(tl, 0)
        kls.append(float((p_ref * (p_ref.log() - p_cpp.log())).sum()))
        agree += int(int(tids[0]) == int(reference_logprobs[i].argmax()))
        d = ref - tl
        gap = max(gap, float((d - d.mean()).abs().max()))
    n = len(kls)
    return RuntimeComparison(n, k, sum(kls) / max(1, n), agree / max(1, n), gap)


@torch.no_grad()
def model_logprobs(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
