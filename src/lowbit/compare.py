"""Compare methods on one model: the same calibration tokens, the same evaluation tokens.

A run is one ``Recipe(scheme=..., method=...)`` with the shared ``CalibrationSpec``. Each run is
quantized by ``quantize_pretrained`` and saved with ``io.save`` in a fresh process of its own
(multiprocessing "spawn"), so its time and peak resident memory are its own and the runs'
memory peaks never add up. Once every run is saved, the float baseline is loaded and each result
is scored against it on identical windows.

A script that calls ``compare_methods`` must do so under ``if __name__ == "__main__":``: "spawn"
imports the script again in each run's process.
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from lowbit import defaults
from lowbit.data.calibration import CalibrationSpec
from lowbit.errors import ConfigError, LowbitError
from lowbit.recipe import Recipe

REPORT_FILE = "lowbit_report.json"
"""The quantization report ``io.save`` writes into each output folder."""
COMPARE_FILE = "compare.json"
"""What ``compare_methods`` writes into a ``keep`` folder: ``compare_result`` of its rows, the
input of ``lowbit report``."""


@dataclass
class CompareRow:
    scheme: str
    method: str
    bits_per_weight: float
    quantized_mb: float
    seconds: float
    """Quantization time, without loading or saving."""
    peak_rss_mb: float
    """Peak resident memory of the run's process, in MB."""
    output_error: float | None
    """Mean over quantized linears of ||XW^T - XQ^T||^2 / ||XW^T||^2 on calibration inputs;
    None when no layer reports one (a data-free run)."""
    perplexity: float
    ppl_change_pct: float
    mean_kl: float
    p99_kl: float
    top1_agreement: float


def compare_methods(
    model: str,
    schemes: list[str],
    methods: list[str],
    calibration: CalibrationSpec | None = None,
    *,
    source: str = defaults.EVAL_SOURCE,
    tokens: int = defaults.EVAL_TOKENS,
    window: int = defaults.EVAL_WINDOW,
    keep: Path | None = None,
    progress: bool = True,
) -> tuple[list[CompareRow], dict]:
    """Quantize ``model`` with every (scheme, method) and score each against the float model.

    calibration: shared by every calibrated method (default ``CalibrationSpec()``).
    source, tokens, window: the evaluation text, how many of its tokens, and the window.
    keep: a folder to keep the quantized models in (``<scheme>-<method>`` each), with the result
    in ``compare.json`` (``compare_result``); otherwise they go to a temporary folder, removed at
    the end, on error and on interrupt.
    Returns the rows, in the order schemes x methods, and what they share (``model``,
    ``baseline_perplexity``, ``tokens_scored``, ...).
    """
    from lowbit import io
    from lowbit.contents import inspect_folder
    from lowbit.data.calibration import evaluation_tokens
    from lowbit.data.text import documents
    from lowbit.eval.metrics import compare_models
    from lowbit.models.load import load_model, load_tokenizer

    calibration = calibration or CalibrationSpec()
    # Every recipe is built first, so that a bad scheme fails before any run starts.
    runs = {(s, m): Recipe(scheme=s, method=m) for s in schemes for m in methods}
    if not runs:
        raise ConfigError("compare needs at least one scheme and one method")
    documents(calibration.source, calibration.split)  # an unreadable calibration text fails now
    ids = evaluation_tokens(load_tokenizer(model), source=source, max_tokens=tokens)
    rows: list[CompareRow] = []
    with _output_folder(keep) as folder:
        outputs = {run: Path(folder) / f"{run[0]}-{run[1]}" for run in runs}
        timings = {}
        for run, recipe in runs.items():
            timings[run] = run_in_process(
                quantize_run, model, recipe.to_dict(), calibration.to_dict(), str(outputs[run]),
                progress, label=" ".join(run),
            )
        reference, _ = load_model(model)
        for (scheme, method), out in outputs.items():
            timing = timings[scheme, method]
            qmodel, _ = io.load(out, with_tokenizer=False)
            fidelity = compare_models(qmodel, reference, ids, window=window, progress=progress)
            del qmodel
            info = inspect_folder(out)
            report = json.loads((out / REPORT_FILE).read_text())
            rows.append(CompareRow(
                scheme, method, info.bits_per_weight, info.quantized_bytes / 1e6,
                timing["seconds"], timing["peak_rss_mb"], mean_output_error(report),
                fidelity.perplexity, fidelity.perplexity_change_pct, fidelity.mean_kl, fidelity.p99_kl,
                fidelity.top1_agreement,
            ))
    meta = {
        "model": model, "baseline_perplexity": fidelity.reference_perplexity,
        "tokens_scored": fidelity.num_scored, "window": fidelity.window, "source": source,
        "calibration": calibration.to_dict(), "outputs": None if keep is None else str(keep),
    }
    if keep is not None:
        (Path(keep) / COMPARE_FILE).write_text(json.dumps(compare_result(rows, meta), indent=2))
    return rows, meta


def compare_result(rows: list[CompareRow], meta: dict) -> dict:
    """The JSON object of a comparison (``lowbit compare --json``, ``compare.json``)."""
    return {"kind": "compare", **meta, "rows": rows_to_dicts(rows)}


def quantize_run(model: str, recipe: dict, calibration: dict, out: str, progress: bool) -> dict:
    """One run, meant for a fresh process: quantize ``model`` following ``recipe`` (a
    ``Recipe.to_dict()``) and save it to ``out``. Returns the quantization time and the
    process's peak resident memory, also written into the saved report."""
    from lowbit import io
    from lowbit.memory import peak_rss_mb
    from lowbit.quantize import quantize_pretrained

    recipe = Recipe.from_dict(recipe)
    qmodel, tokenizer, report = quantize_pretrained(
        model, recipe, CalibrationSpec.from_dict(calibration), progress=progress
    )
    report.extra["peak_rss_mb"] = round(peak_rss_mb(), 1)
    io.save(qmodel, out, tokenizer=tokenizer, recipe=recipe, report=report.to_dict(), overwrite=True)
    return {"seconds": report.seconds, "peak_rss_mb": report.extra["peak_rss_mb"]}


def mean_output_error(report: dict) -> float | None:
    """Mean of ``output_error`` over the layers of a saved report; None when no layer has one."""
    errors = [layer.get("output_error") for layer in report.get("layers", [])]
    errors = [e for e in errors if e is not None]
    return sum(errors) / len(errors) if errors else None


def run_in_process(fn, *args, label: str):
    """``fn(*args)`` in a fresh "spawn" process: its result, or its error raised here.

    ``fn`` and ``args`` must pickle (a module-level function, plain values). If this process is
    interrupted, the child is stopped before the interrupt goes on.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_answer, args=(send, fn, args), daemon=True)
    process.start()
    send.close()  # the child holds the only writer now: its exit ends the pipe
    try:
        ok, value = receive.recv()
    except EOFError:
        process.join()
        raise LowbitError(
            f"{label}: its process ended with exit code {process.exitcode} before finishing "
            "(out of memory?)"
        ) from None
    except BaseException:
        process.terminate()
        process.join()
        raise
    finally:
        receive.close()
    process.join()
    if ok:
        return value
    if isinstance(value, LowbitError):
        raise LowbitError(f"{label}: {value}") from None
    raise RuntimeError(f"{label} failed in its process:\n{value}")


def _answer(send, fn, args) -> None:
    """In the child: send ``(True, result)``, ``(False, LowbitError)`` or ``(False, traceback)``."""
    try:
        answer = (True, fn(*args))
    except LowbitError as e:
        answer = (False, e)
    except BaseException:
        answer = (False, traceback.format_exc())
    send.send(answer)
    send.close()


def _output_folder(keep: Path | None):
    """A context giving the folder for the runs' outputs: ``keep``, or a temporary folder."""
    if keep is None:
        return tempfile.TemporaryDirectory(prefix="lowbit-compare-")
    Path(keep).mkdir(parents=True, exist_ok=True)
    return nullcontext(str(keep))


def rows_to_dicts(rows: list[CompareRow]) -> list[dict]:
    return [asdict(r) for r in rows]
