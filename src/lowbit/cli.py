"""The ``lowbit`` command line: quantize, eval, inspect, compare, models."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from lowbit.errors import ConfigError, LowbitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize Hugging Face causal LMs and measure what it cost.")
# Tables are wide; when output is not a terminal, do not squeeze them into 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def friendly(fn):
    """Errors a user can cause end in one line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LowbitError as e:
            err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; no output was written")
            raise typer.Exit(130) from None

    return wrapper


def _setup(quiet: bool) -> bool:
    """Configure logging and progress output for this process; returns whether to show progress."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return not quiet


def _parse_options(options: list[str]) -> dict:
    out = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {item!r}: write it as key=value, e.g. --option dampening=0.05")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _build_recipe(scheme, method, recipe_file, options, ignore, targets):
    from lowbit.recipe import Recipe

    if recipe_file is not None:
        return Recipe.from_file(recipe_file)
    fields = {"scheme": scheme, "method": method, "method_options": _parse_options(options)}
    if ignore:
        fields["ignore"] = tuple(ignore)
    if targets:
        fields["targets"] = tuple(targets)
    return Recipe(**fields)


@app.command()
@friendly
def quantize(
    model: str = typer.Argument(..., help="bundled name (smollm2-135m, gemma3-270m), HF folder, .gguf file or hub id"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (must not exist unless --overwrite)"),
    scheme: str = typer.Option("w4a16", help="scheme: w8, w4g128, w4g128-asym, w3g128, w2g64-asym, nf4, fp8, ..."),
    method: str = typer.Option("rtn", help="rtn, gptq, awq or hqq"),
    recipe: Optional[Path] = typer.Option(None, help="a recipe JSON file (overrides --scheme/--method)"),
    option: list[str] = typer.Option([], "--option", help="method option key=value (repeatable)"),
    ignore: list[str] = typer.Option([], help="layer name or re:pattern to keep in float (repeatable; default lm_head)"),
    targets: list[str] = typer.Option([], help="layer name or re:pattern to quantize (repeatable; default all linears)"),
    calib: str = typer.Option("wiki", help="calibration text: wiki, lee, a .txt/.jsonl file or a hub dataset"),
    samples: int = typer.Option(128, help="calibration samples"),
    seq_len: int = typer.Option(512, help="tokens per calibration sample"),
    seed: int = typer.Option(0, help="calibration sampling seed"),
    batch_size: int = typer.Option(8, help="calibration samples per forward pass"),
    lazy: bool = typer.Option(True, help="read layer weights from disk only when needed (--no-lazy loads the whole model)"),
    device: Optional[str] = typer.Option(None, help="compute device for each layer, e.g. cuda"),
    low_memory: bool = typer.Option(False, help="return freed memory to the system at once: lower peak, slower (docs/results.md)"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    quiet: bool = typer.Option(False, help="no progress bars or info logs"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
):
    """Quantize MODEL and save it to --out."""
    from lowbit import io
    from lowbit.data.calibration import CalibrationSpec
    from lowbit.quantize import quantize_pretrained

    progress = _setup(quiet or as_json)
    if out.exists() and not overwrite:
        raise LowbitError(f"output {out} already exists; choose another path or pass --overwrite")
    r = _build_recipe(scheme, method, recipe, option, ignore, targets)
    if low_memory:
        from lowbit.memory import serve_large_blocks_with_mmap

        serve_large_blocks_with_mmap()
    spec = CalibrationSpec(source=calib, num_samples=samples, seq_len=seq_len, seed=seed)
    qmodel, tokenizer, report = quantize_pretrained(
        model, r, spec, lazy=lazy, batch_size=batch_size, device=device, progress=progress
    )
    from lowbit.memory import peak_rss_mb

    report.extra["peak_rss_mb"] = round(peak_rss_mb(), 1)
    report.extra["lazy"] = lazy
    report.extra["low_memory"] = low_memory
    path = io.save(qmodel, out, tokenizer=tokenizer, recipe=r, report=report.to_dict(), overwrite=overwrite)
    summary = {
        "out": str(path), "model": model, "scheme": r.scheme.name(), "method": r.method,
        "layers": len(report.layers), "bits_per_weight": round(report.bits_per_weight, 3),
        "seconds": round(report.seconds, 1), "peak_rss_mb": report.extra["peak_rss_mb"],
    }
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(
            f"quantized {summary['layers']} layers of {model} with {r.method} {r.scheme.name()} "
            f"({summary['bits_per_weight']} bits/weight) in {summary['seconds']} s, "
            f"peak memory {summary['peak_rss_mb']:.0f} MB -> {path}",
            highlight=False,
        )


def _load_any(spec: str):
    """A lowbit folder, or any model spec the loader accepts (float baseline)."""
    from lowbit import io
    from lowbit.models.load import load_model

    if Path(spec).is_dir() and _is_lowbit(Path(spec)):
        return io.load(spec)
    return load_model(spec)


def _is_lowbit(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == "lowbit"


def _size_row(spec: str) -> tuple[float, float]:
    """(file size in MB, bits per weight of the quantized linears or of the float weights)."""
    from lowbit.contents import inspect_folder, tensor_bytes
    from lowbit.models.load import resolve_model

    if Path(spec).is_dir() and _is_lowbit(Path(spec)):
        info = inspect_folder(spec)
        return info.file_bytes / 1e6, info.bits_per_weight
    folder = resolve_model(spec).folder
    sizes = tensor_bytes(Path(folder))
    return sum(sizes.values()) / 1e6, float("nan")


@app.command("eval")
@friendly
def eval_(
    model: str = typer.Argument(..., help="a quantized lowbit folder (or any model spec)"),
    baseline: str = typer.Option(..., help="the original model (bundled name, folder, .gguf or hub id)"),
    source: str = typer.Option("wiki", help="evaluation text (its evaluation split)"),
    tokens: int = typer.Option(4096, help="evaluation tokens (whole windows)"),
    window: int = typer.Option(512, help="tokens per window"),
    stride: Optional[int] = typer.Option(None, help="window stride (default: the window; smaller scores with extra context)"),
    quiet: bool = typer.Option(False, help="no progress bars or info logs"),
    as_json: bool = typer.Option(False, "--json", help="print the same content as JSON"),
):
    """Measure MODEL against --baseline: size, bits/weight, perplexity, KL divergence, top-1."""
    from lowbit.data.calibration import evaluation_tokens
    from lowbit.eval.metrics import compare_models

    progress = _setup(quiet or as_json)
    qmodel, tokenizer = _load_any(model)
    ref, _ = _load_any(baseline)
    ids = evaluation_tokens(tokenizer, source=source, max_tokens=tokens)
    r = compare_models(qmodel, ref, ids, window=window, stride=stride, progress=progress)
    q_mb, q_bits = _size_row(model)
    b_mb, _ = _size_row(baseline)
    rows = [
        {"model": baseline, "size_mb": round(b_mb, 2), "bits_per_weight": None,
         "perplexity": round(r.reference_perplexity, 4), "ppl_change_pct": 0.0,
         "mean_kl": 0.0, "p99_kl": 0.0, "top1_agreement": 1.0},
        {"model": model, "size_mb": round(q_mb, 2), "bits_per_weight": round(q_bits, 3),
         "perplexity": round(r.perplexity, 4), "ppl_change_pct": round(r.perplexity_change_pct, 3),
         "mean_kl": round(r.mean_kl, 5), "p99_kl": round(r.p99_kl, 5),
         "top1_agreement": round(r.top1_agreement, 4)},
    ]
    result = {"tokens_scored": r.num_scored, "window": r.window, "stride": r.stride, "source": source, "rows": rows}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"fidelity on {r.num_scored} {source} tokens (window {r.window}, stride {r.stride})")
    for col in ("model", "size MB", "bits/weight", "perplexity", "ppl change", "mean KL", "KL p99", "top-1"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in rows:
        table.add_row(
            row["model"], f"{row['size_mb']:.1f}",
            "float" if row["bits_per_weight"] is None else f"{row['bits_per_weight']:.2f}",
            f"{row['perplexity']:.3f}", f"{row['ppl_change_pct']:+.2f}%", f"{row['mean_kl']:.4f}",
            f"{row['p99_kl']:.4f}", f"{row['top1_agreement']:.3f}",
        )
    console.print(table)


@app.command()
@friendly
def inspect(
    folder: Path = typer.Argument(..., help="a quantized lowbit folder"),
    as_json: bool = typer.Option(False, "--json", help="print the same content as JSON"),
):
    """Per-layer schemes and sizes of a quantized model."""
    from lowbit.contents import inspect_folder

    info = inspect_folder(folder)
    if as_json:
        print(json.dumps(info.to_dict(), indent=2))
        return
    table = Table(title=f"{folder}: {len(info.layers)} quantized layers")
    for col in ("layer", "format", "block", "zero point", "shape", "KB", "bits/weight"):
        table.add_column(col, justify="left" if col in ("layer", "format") else "right")
    for layer in info.layers:
        table.add_row(
            layer.name, layer.format, "x".join(map(str, layer.block_size)), layer.zero_point or "-",
            "x".join(map(str, layer.shape)), f"{layer.bytes / 1e3:.1f}", f"{layer.bits_per_weight:.3f}",
        )
    console.print(table)
    console.print(
        f"quantized layers: {info.quantized_params:,} weights in {info.quantized_bytes / 1e6:.2f} MB "
        f"({info.bits_per_weight:.3f} bits/weight); other tensors {info.other_bytes / 1e6:.2f} MB; "
        f"total {info.file_bytes / 1e6:.2f} MB",
        highlight=False,
    )


@app.command()
@friendly
def compare(
    model: str = typer.Argument(..., help="bundled name, HF folder, .gguf file or hub id"),
    methods: str = typer.Option("rtn,hqq,gptq,awq", help="comma-separated methods"),
    scheme: str = typer.Option("w4g128", help="comma-separated schemes, e.g. w4g128,w3g128"),
    calib: str = typer.Option("wiki", help="calibration text (shared by every method)"),
    samples: int = typer.Option(128, help="calibration samples"),
    seq_len: int = typer.Option(512, help="tokens per calibration sample"),
    seed: int = typer.Option(0, help="calibration sampling seed"),
    source: str = typer.Option("wiki", help="evaluation text (its evaluation split)"),
    tokens: int = typer.Option(4096, help="evaluation tokens"),
    window: int = typer.Option(512, help="tokens per evaluation window"),
    keep: Optional[Path] = typer.Option(None, help="keep the quantized models in this folder"),
    quiet: bool = typer.Option(False, help="no progress bars or info logs"),
    as_json: bool = typer.Option(False, "--json", help="print the same content as JSON"),
):
    """Quantize MODEL with several methods on the same data and print one table."""
    from lowbit.compare import compare as run_compare, rows_to_dicts

    progress = _setup(quiet or as_json)
    quantize_args = ["--calib", calib, "--samples", str(samples), "--seq-len", str(seq_len),
                     "--seed", str(seed)]
    rows, meta = run_compare(
        model, _split(scheme), _split(methods), quantize_args=quantize_args, source=source,
        tokens=tokens, window=window, keep=keep, progress=progress,
    )
    if as_json:
        print(json.dumps({**meta, "rows": rows_to_dicts(rows)}, indent=2))
        return
    table = Table(title=f"{model}: {meta['tokens_scored']} {source} tokens, baseline perplexity "
                        f"{meta['baseline_perplexity']:.3f}; calibration {samples} x {seq_len} {calib}")
    for col in ("scheme", "method", "bits/weight", "MB", "time s", "peak MB", "perplexity",
                "ppl change", "mean KL", "KL p99", "top-1"):
        table.add_column(col, justify="left" if col in ("scheme", "method") else "right")
    for r in rows:
        table.add_row(r.scheme, r.method, f"{r.bits_per_weight:.3f}", f"{r.quantized_mb:.1f}",
                      f"{r.seconds:.0f}", f"{r.peak_rss_mb:.0f}", f"{r.perplexity:.3f}",
                      f"{r.ppl_change_pct:+.1f}%", f"{r.mean_kl:.4f}", f"{r.p99_kl:.3f}",
                      f"{r.top1_agreement:.3f}")
    console.print(table)


def _split(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"expected a comma-separated list, got {text!r}")
    return items


@app.command()
@friendly
def models():
    """The bundled models and where their weights come from."""
    from lowbit.models.bundled import BUNDLED

    for name, record in BUNDLED.items():
        console.print(f"[bold]{name}[/bold]: {record.note}", highlight=False)


def main() -> None:
    app(prog_name="lowbit")


if __name__ == "__main__":
    sys.exit(main())
