"""Compare methods on one model: the same calibration tokens, the same evaluation tokens.

Each (scheme, method) is quantized by a child ``lowbit quantize`` process, so its time and peak
resident memory are its own; the parent then scores every result against the float baseline on
identical windows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from lowbit.errors import LowbitError


@dataclass
class CompareRow:
    scheme: str
    method: str
    bits_per_weight: float
    quantized_mb: float
    seconds: float
    peak_rss_mb: float
    perplexity: float
    ppl_change_pct: float
    mean_kl: float
    p99_kl: float
    top1_agreement: float


def quantize_in_child(model: str, scheme: str, method: str, out: Path, quantize_args: list[str],
                      quiet: bool) -> dict:
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", model, "--out", str(out),
           "--scheme", scheme, "--method", method, "--json", *quantize_args]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None,
                          text=True)
    if done.returncode != 0:
        raise LowbitError(f"{method} {scheme} failed (exit {done.returncode}); run `{' '.join(cmd[2:])}` to see why")
    return json.loads(done.stdout)


def compare(model: str, schemes: list[str], methods: list[str], *, quantize_args: list[str] = (),
            source: str = "wiki", tokens: int = 4096, window: int = 512, keep: Path | None = None,
            progress: bool = True) -> tuple[list[CompareRow], dict]:
    from lowbit import io
    from lowbit.data.calibration import evaluation_tokens
    from lowbit.eval.metrics import compare_models
    from lowbit.contents import inspect_folder
    from lowbit.models.load import load_model

    reference, tokenizer = load_model(model)
    ids = evaluation_tokens(tokenizer, source=source, max_tokens=tokens)
    rows: list[CompareRow] = []
    temporary = None if keep else tempfile.TemporaryDirectory(prefix="lowbit-compare-")
    workdir = keep or Path(temporary.name)
    base_ppl, scored = None, 0
    for scheme in schemes:
        for method in methods:
            out = workdir / f"{scheme}-{method}"
            summary = quantize_in_child(model, scheme, method, out, [*quantize_args, "--overwrite"],
                                        quiet=not progress)
            qmodel, _ = io.load(out, with_tokenizer=False)
            r = compare_models(qmodel, reference, ids, window=window, stride=window, progress=progress)
            base_ppl, scored = r.reference_perplexity, r.num_scored
            info = inspect_folder(out)
            rows.append(CompareRow(
                scheme, method, info.bits_per_weight, info.quantized_bytes / 1e6,
                summary["seconds"], summary["peak_rss_mb"], r.perplexity, r.perplexity_change_pct,
                r.mean_kl, r.p99_kl, r.top1_agreement,
            ))
            del qmodel
    if temporary is not None:
        temporary.cleanup()
    meta = {"model": model, "baseline_perplexity": base_ppl, "tokens_scored": scored,
            "window": window, "source": source, "quantize_args": list(quantize_args),
            "outputs": str(workdir) if keep else None}
    return rows, meta


def rows_to_dicts(rows: list[CompareRow]) -> list[dict]:
    return [asdict(r) for r in rows]
