"""The accuracy budget gate: a quantized model against its original on identical task items.

Both models answer the same items, so their accuracies are paired. With c_b,i and c_q,i the
0/1 correctness of item i (baseline, quantized) and d_i = c_q,i - c_b,i:

    change        Δ = mean(d) = acc_q - acc_b
    paired error  se(Δ) = sd(d) / sqrt(n)            (sample sd, n - 1)
    McNemar       b = #{c_b=1, c_q=0}, c = #{c_b=0, c_q=1};  p = P(Bin(b + c, 1/2) <= min(b, c)) x 2

se(Δ) is much smaller than the accuracies' own errors sqrt(p(1-p)/n) because most items are
answered alike by both models (only discordant items contribute to sd(d)).

The gate, with budget β (relative, e.g. 0.02) and one-sided confidence 1 - α:

    allowed loss  L = β acc_b
    fail          when (acc_b - acc_q) - z_{1-α} se(Δ) > L   (the loss exceeds L beyond noise)
    noise         when acc_b - acc_q > L but not beyond noise (more items would decide)
    pass          otherwise

Baseline results are cached by a hash of the model's weights and the task settings, so
validating several quantized models against one original scores the original once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

import torch

from lowbit import defaults
from lowbit.errors import ConfigError


@dataclass
class TaskComparison:
    task: str
    metric: str
    n: int
    baseline_accuracy: float
    accuracy: float
    baseline_stderr: float
    stderr: float
    change: float
    """acc_q - acc_b (absolute, as a fraction)."""
    relative_change: float
    """(acc_q - acc_b) / acc_b."""
    recovery: float
    """100 acc_q / acc_b."""
    paired_stderr: float
    """se(Δ) over the paired items."""
    baseline_only: int
    """Items the baseline answers right and the quantized model wrong (McNemar's b)."""
    quantized_only: int
    """Items the quantized model answers right and the baseline wrong (McNemar's c)."""
    p_value: float
    """Exact two-sided McNemar test of equal accuracy."""
    allowed_loss: float
    """β acc_b: the largest absolute loss within the budget."""
    verdict: str
    """"pass", "noise" (over the budget but within noise) or "fail"."""

    def to_dict(self) -> dict:
        return asdict(self)


def parse_budget(text: str | float) -> float:
    """``"2%"`` -> 0.02; a bare number is a fraction (``0.02``) and must be below 1."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"--budget must be a percentage like 2% or a fraction like 0.02, got {text!r}") from None
    if not 0 <= value < 1 or math.isnan(value):
        raise ConfigError(f"--budget must lie in [0%, 100%), got {text!r}; write 2% (or 0.02) for two percent")
    return value


def compare_results(baseline, quantized, budget: float, confidence: float = defaults.BUDGET_CONFIDENCE,
                    ) -> TaskComparison:
    """Pair two ``TaskResult``s of the same task and settings and apply the budget gate."""
    if baseline.task != quantized.task or baseline.item_ids != quantized.item_ids:
        raise ConfigError(
            f"{baseline.task} and {quantized.task} were scored on different items; score both with the "
            "same --tasks, --shots, --limit and --seed")
    n = len(baseline.correct)
    cb = torch.tensor(baseline.correct, dtype=torch.float64)
    cq = torch.tensor(quantized.correct, dtype=torch.float64)
    d = cq - cb
    paired = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    b = int(((cb == 1) & (cq == 0)).sum())
    c = int(((cb == 0) & (cq == 1)).sum())
    acc_b, acc_q = float(cb.mean()), float(cq.mean())
    loss = acc_b - acc_q
    allowed = budget * acc_b
    z = NormalDist().inv_cdf(confidence)
    if loss <= allowed:
        verdict = "pass"
    elif n > 1 and loss - z * paired > allowed:
        verdict = "fail"
    else:
        verdict = "noise"
    return TaskComparison(
        task=baseline.task, metric=baseline.metric, n=n, baseline_accuracy=acc_b, accuracy=acc_q,
        baseline_stderr=baseline.stderr, stderr=quantized.stderr, change=-loss,
        relative_change=-loss / acc_b if acc_b else float("nan"),
        recovery=100 * acc_q / acc_b if acc_b else float("nan"), paired_stderr=paired,
        baseline_only=b, quantized_only=c, p_value=mcnemar_p(b, c), allowed_loss=allowed, verdict=verdict,
    )


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: twice the binomial tail P(X <= min(b, c)), X ~ Bin(b + c, 1/2)."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**m)


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes): the same weights give the same
    key whatever file they were loaded from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ResultCache:
    """Task results on disk, keyed by (model fingerprint, task settings); written atomically."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def _file(self, fingerprint: str, settings: dict) -> Path:
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.folder / f"{fingerprint[:16]}-{key}.json"

    def get(self, fingerprint: str, settings: dict) -> dict | None:
        file = self._file(fingerprint, settings)
        try:
            found = json.loads(file.read_text())
        except (OSError, ValueError):
            return None
        if found.get("fingerprint") != fingerprint or found.get("settings") != json.loads(
                json.dumps(settings, default=str)):
            return None
        return found.get("result")

    def put(self, fingerprint: str, settings: dict, result: dict) -> None:
        file = self._file(fingerprint, settings)
        text = json.dumps({"fingerprint": fingerprint, "settings": settings, "result": result}, default=str)
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, file)
        except OSError:  # a cache that cannot be written only costs time
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def default_cache() -> ResultCache:
    from lowbit.models.load import cache_root

    return ResultCache(cache_root().parent / "tasks")


def evaluate_cached(model, tokenizer, tasks: list[str], cache: ResultCache | None, *, progress: bool = True,
                    **settings) -> tuple[list, list[str]]:
    """``tasks.evaluate`` task by task, reusing cached results of the same weights and settings.
    Returns the results and the names of the tasks read from the cache."""
    from lowbit.eval.tasks import PROMPT_VERSION, TaskResult, evaluate

    fingerprint = model_fingerprint(model) if cache is not None else ""
    results, cached = [], []
    for task in tasks:
        key = {"task": task, "prompt_version": PROMPT_VERSION,
               **{k: v for k, v in settings.items() if k not in ("batch_size", "data_dir")}}
        found = cache.get(fingerprint, key) if cache is not None else None
        if found is not None:
            results.append(TaskResult(**found))
            cached.append(task)
            continue
        (result,) = evaluate(model, tokenizer, [task], progress=progress, **settings)
        if cache is not None:
            cache.put(fingerprint, key, result.to_dict())
        results.append(result)
    return results, cached
