"""Perplexity and fidelity metrics against slow per-token references on a tiny model."""

import copy
import math

import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.eval import compare_models, perplexity, windows
from lowbit.eval.metrics import count_windows, quantile
from lowbit.models.tiny import tiny_model

N_TOKENS = 45


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 259, (1, N_TOKENS), generator=g)


def _context_start(p: int, window: int, stride: int) -> int | None:
    """Where the context of target ``p`` starts under the documented rule; None if unscored."""
    if stride == window:
        return None if p % window == 0 else (p // window) * window
    if p < window:
        return 0
    # The first window whose span [k*stride, k*stride + window) contains p.
    return math.ceil((p - window + 1) / stride) * stride


def _reference_logprobs(model, tokens, window, stride):
    """Per scored target: its position and float64 log-probabilities from a separate forward."""
    stream = tokens[0]
    positions, rows = [], []
    with torch.no_grad():
        for p in range(1, stream.numel()):
            start = _context_start(p, window, stride)
            if start is None:
                continue
            logits = model(input_ids=stream[None, start:p]).logits[0, -1]
            positions.append(p)
            rows.append(torch.log_softmax(logits.double(), -1))
    return torch.tensor(positions), torch.stack(rows)


@pytest.mark.parametrize("n, window, stride", [(45, 16, 16), (45, 16, 5), (16, 16, 16), (17, 16, 3),
                                               (2, 4, 4), (50, 10, 9)])
def test_windows_score_each_token_at_most_once(n, window, stride):
    scored, contexts = [], []
    wins = list(windows(torch.arange(n), window, stride))
    for w in wins:
        begin = int(w.input_ids[0, 0])  # tokens are their own positions here
        assert w.input_ids.shape[1] <= window
        scored.extend(range(begin + w.score_from, begin + w.input_ids.shape[1]))
        contexts.append(begin)
    expected = [p for p in range(1, n) if _context_start(p, window, stride) is not None]
    assert scored == expected
    assert len(wins) == count_windows(n, window, stride)
    # Later windows (stride < window) keep their first window - stride tokens as context only.
    assert all(w.score_from == (1 if stride == window or i == 0 else window - stride)
               for i, w in enumerate(wins))


@pytest.mark.parametrize("window, stride", [(16, 16), (16, 6)])
def test_perplexity_matches_per_token_reference(tiny_llama, tokens, window, stride):
    result = perplexity(tiny_llama, tokens, window=window, stride=stride, progress=False)
    positions, logp = _reference_logprobs(tiny_llama, tokens, window, stride)
    nll = -logp[torch.arange(len(positions)), tokens[0, positions]]
    assert result.num_scored == len(positions)
    assert result.perplexity == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert result.mean_nll == pytest.approx(nll.mean().item(), rel=1e-5)


def test_compare_model_with_itself(tiny_llama, tokens):
    report = compare_models(tiny_llama, tiny_llama, tokens, window=16, stride=16, progress=False)
    assert report.mean_kl == 0.0 and report.p99_kl == 0.0
    assert report.top1_agreement == 1.0
    assert report.perplexity == report.reference_perplexity
    assert report.perplexity_change_pct == 0.0
    assert report.num_scored == N_TOKENS - math.ceil(N_TOKENS / 16)


@pytest.mark.parametrize("window, stride", [(16, 16), (16, 6)])
def test_compare_against_perturbed_copy_matches_naive(tiny_llama, tokens, window, stride):
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    report = compare_models(model, tiny_llama, tokens, window=window, stride=stride, progress=False)

    positions, logq = _reference_logprobs(model, tokens, window, stride)
    _, logp = _reference_logprobs(tiny_llama, tokens, window, stride)
    targets = tokens[0, positions]
    # Naive KL(P_ref || P_model) over the full vocabulary, one position at a time.
    kl = torch.tensor([sum(float(math.exp(a) * (a - b)) for a, b in zip(lp.tolist(), lq.tolist()))
                       for lp, lq in zip(logp, logq)])
    idx = torch.arange(len(positions))
    ppl = math.exp(-logq[idx, targets].mean().item())
    ref_ppl = math.exp(-logp[idx, targets].mean().item())

    assert report.num_scored == len(positions)
    assert report.mean_kl > 0
    assert report.mean_kl == pytest.approx(kl.mean().item(), rel=1e-4)
    assert report.p99_kl == pytest.approx(torch.quantile(kl.double(), 0.99).item(), rel=1e-4)
    assert report.p99_kl >= report.mean_kl
    assert report.top1_agreement == (logq.argmax(-1) == logp.argmax(-1)).double().mean().item()
    assert report.perplexity == pytest.approx(ppl, rel=1e-5)
    assert report.reference_perplexity == pytest.approx(ref_ppl, rel=1e-5)
    change = 100 * (ppl / ref_ppl - 1)
    assert report.perplexity_change_pct == pytest.approx(change, rel=1e-3, abs=1e-6)


def test_compare_rejects_different_vocabularies(tiny_llama, tokens):
    other = tiny_model("llama", seed=0, vocab_size=300)
    with pytest.raises(ConfigError, match="vocabulary sizes differ"):
        compare_models(other, tiny_llama, tokens, window=16, progress=False)


def test_bad_arguments(tiny_llama, tokens):
    with pytest.raises(ConfigError, match="shape"):
        perplexity(tiny_llama, tokens.repeat(2, 1), window=16, progress=False)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(tiny_llama, tokens, window=16, stride=17, progress=False)
    with pytest.raises(ConfigError, match="positions"):
        perplexity(tiny_llama, tokens, window=1024, progress=False)


def test_progress_bar_can_be_switched_off(tiny_llama, tokens, capsys):
    perplexity(tiny_llama, tokens, window=16, progress=False)
    assert capsys.readouterr().err == ""
    perplexity(tiny_llama, tokens, window=16, progress=True)
    assert "perplexity" in capsys.readouterr().err


def test_quantile_matches_torch():
    values = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.5, 0.99, 1.0):
        expected = torch.quantile(values.double(), q).item()
        assert quantile(values, q) == pytest.approx(expected, abs=1e-12)


def test_non_finite_logits_fail_loudly(tiny_llama, tokens):
    from lowbit.errors import NonFiniteError

    broken = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"the model yields NaN logits \(window 1\)"):
        perplexity(broken, tokens, window=16, progress=False)
    with pytest.raises(NonFiniteError, match="the model yields NaN logits"):
        compare_models(broken, tiny_llama, tokens, window=16, progress=False)
    with pytest.raises(NonFiniteError, match="the reference yields NaN logits"):
        compare_models(tiny_llama, broken, tokens, window=16, progress=False)


def test_config_differences_name_the_fields(tiny_llama):
    from lowbit.eval.metrics import config_differences

    assert config_differences(tiny_llama, copy.deepcopy(tiny_llama)) == []
    other = tiny_model("llama", seed=1, num_hidden_layers=1)
    assert config_differences(other, tiny_llama) == ["num_hidden_layers 1 vs 2"]
    assert "model_type qwen2 vs llama" in config_differences(tiny_model("qwen2"), tiny_llama)
