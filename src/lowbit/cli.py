"""The ``lowbit`` command line: quantize, eval, inspect, compare, models."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lowbit import defaults
from lowbit.errors import ConfigError, LowbitError

# rich_markup_mode=None: help texts are plain text, so "wBITS[gGROUP]" is shown as written.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Quantize Hugging Face causal LMs and measure what it cost.")
# Tables are wide; when output is not a terminal, do not squeeze them into 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that the same clean-up runs as for Ctrl-C."""


@contextlib.contextmanager
def _sigterm_interrupts():
    """While the command runs, SIGTERM raises Terminated (a second one is ignored, so that the
    clean-up it started can finish); the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error(message: str) -> None:
    """One ``error:`` line; the message is user text, never markup."""
    err_console.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", highlight=False,
                      soft_wrap=True)


def friendly(fn):
    """Errors a user can cause end in one line, not a traceback; an interrupt (Ctrl-C, SIGTERM)
    removes what was being written."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_interrupts():
                return fn(*args, **kwargs)
        except LowbitError as e:
            _error(str(e))
            raise typer.Exit(2) from None
        except OSError as e:  # the file system refused something the user named
            from lowbit.outputs import describe_os_error

            _error(describe_os_error(e))
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:
            terminated = isinstance(e, Terminated)
            err_console.print(f"{'terminated' if terminated else 'interrupted'}; no output was written",
                              highlight=False, markup=False)
            raise typer.Exit(143 if terminated else 130) from None

    return wrapper


def _setup(quiet: bool) -> bool:
    """Configure logging and progress output for this process; returns whether to show progress."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return not quiet


def _parse_options(options: list[str]) -> dict[str, str]:
    """``key=value`` pairs as text: each method converts a value by its option's type
    (``lowbit.core.records.from_dict``), so ``optimize_scale=False`` is False."""
    out = {}
    for item in options:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--option {item!r}: write it as key=value, e.g. --option dampening=0.05")
        if key in out:
            raise ConfigError(f"--option {key} is given twice")
        out[key] = value.strip()
    return out


_RECIPE_FIELDS = ("scheme", "method", "option", "ignore", "targets")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user typed option ``name`` (typer vendors click, so compare by name)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _build_recipe(ctx: typer.Context, scheme, method, recipe_file, options, ignore, targets):
    """The recipe of a ``quantize`` command, validated (stages, options, observers, patterns).

    A recipe file holds the whole plan, so it cannot be combined with the options that make
    one. ``--ignore`` adds to the default ignore list (lm_head), it does not replace it."""
    from lowbit.recipe import DEFAULT_IGNORE, Recipe

    if recipe_file is not None:
        given = [f"--{name}" for name in _RECIPE_FIELDS if _given(ctx, name)]
        if given:
            raise ConfigError(
                f"--recipe holds the scheme, method, options and layer selection; {', '.join(given)} "
                "would be ignored: put them in the recipe file or drop --recipe"
            )
        return Recipe.from_file(recipe_file)
    fields = {"scheme": scheme, "method": method, "method_options": _parse_options(options)}
    fields["ignore"] = tuple(DEFAULT_IGNORE) + tuple(p for p in ignore if p not in DEFAULT_IGNORE)
    if targets:
        fields["targets"] = tuple(targets)
    return Recipe(**fields)


def _check_device(device: str | None):
    """The torch device ``--device`` names, if this machine has it (ConfigError otherwise)."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    if dev.type == "mps":
        available, count = torch.backends.mps.is_available(), None
    else:
        available = bool(getattr(backend, "is_available", lambda: False)())
        count = getattr(backend, "device_count", None)
    if not available:
        raise ConfigError(f"--device {device}: this PyTorch ({torch.__version__}) has no usable "
                          f"{dev.type} device; use --device cpu, or install a PyTorch built for {dev.type}")
    if dev.index is not None and count is not None and dev.index >= count():
        raise ConfigError(f"--device {device}: there are {count()} {dev.type} device(s), numbered from 0")
    return dev


def _source_paths(spec: str) -> list[Path]:
    """What a model spec reads, for the output-path check, without loading or converting it:
    the path itself when it exists, and the model caches (lowbit's, the Hugging Face hub's)."""
    from huggingface_hub import constants

    from lowbit.models.bundled import get_bundled
    from lowbit.models.load import cache_root

    paths = [cache_root(), Path(constants.HF_HUB_CACHE)]
    path = Path(spec).expanduser()
    if get_bundled(spec) is None and path.exists():
        paths.append(path)
    return paths


def _min_output_bytes(spec: str) -> int:
    """A lower bound on a quantized model's size: 1/16 of a local float checkpoint (2-bit codes
    of float32 weights); 0 when the source is not a local folder yet."""
    from lowbit.models.bundled import get_bundled
    from lowbit.models.load import cache_root

    folder = cache_root() / spec if get_bundled(spec) is not None else Path(spec).expanduser()
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) // 16


@app.command()
@friendly
def quantize(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="bundled name (smollm2-135m, gemma3-270m), HF folder, .gguf file or hub id"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (must not exist unless --overwrite)"),
    scheme: str = typer.Option(
        defaults.SCHEME,
        help="a preset (W4A16, W8A16, W8A8, FP8, FP8_DYNAMIC, ...) or wBITS[gGROUP][-asym][-OBSERVER], "
        "e.g. w8, w4g128, w4g128-asym, w3g128, w2g64-asym, nf4, fp8_e4m3"),
    method: str = typer.Option(
        defaults.METHOD, help="rtn, gptq, awq, hqq, or stages joined by + (awq+gptq: AWQ's scales, then GPTQ)"),
    recipe: Path | None = typer.Option(
        None, help="a recipe JSON file (instead of --scheme/--method/--option/--ignore/--targets)"),
    option: list[str] = typer.Option([], "--option", help="method option key=value (repeatable)"),
    ignore: list[str] = typer.Option(
        [], help="layer name or re:pattern to keep in float, besides lm_head (repeatable)"),
    targets: list[str] = typer.Option(
        [], help="layer name or re:pattern to quantize (repeatable; default all linears)"),
    calib: str = typer.Option(
        defaults.CALIBRATION_SOURCE,
        help="calibration text: wiki, lee, a .txt/.jsonl file or a hub dataset; data-free methods (rtn, hqq) "
        "use it only when given, to measure each layer's output error"),
    samples: int = typer.Option(defaults.CALIBRATION_SAMPLES, help="calibration samples"),
    seq_len: int = typer.Option(defaults.CALIBRATION_SEQ_LEN, help="tokens per calibration sample"),
    seed: int = typer.Option(defaults.CALIBRATION_SEED, help="calibration sampling seed"),
    batch_size: int = typer.Option(defaults.BATCH_SIZE, help="calibration samples per forward pass"),
    lazy: bool = typer.Option(
        True, help="read layer weights from disk only when needed (--no-lazy loads the whole model)"),
    device: str | None = typer.Option(None, help="compute device for each layer, e.g. cuda"),
    low_memory: bool = typer.Option(
        False, help="return freed memory to the system at once: lower peak, slower (docs/results.md)"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder that lowbit wrote (nothing else)"),
    keep_nonfinite_float: bool = typer.Option(
        False, "--keep-nonfinite-float",
        help="keep a linear whose weights or scales are NaN/Inf in float (listed in the report) instead of refusing"),
    export_format: str | None = typer.Option(
        None, "--format", help="write this format instead of lowbit's own: compressed-tensors, gptq, awq, "
        "bitsandbytes, gguf[:FILE_TYPE] (see `lowbit export --help`)"),
    quiet: bool = typer.Option(False, help="no progress bars or info logs"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
):
    """Quantize MODEL and save it to --out."""
    from lowbit import io
    from lowbit.data.calibration import CalibrationSpec
    from lowbit.data.text import documents
    from lowbit.models.load import needs_conversion_or_download, resolve_model
    from lowbit.outputs import check_output
    from lowbit.quantize import quantize_pretrained

    progress = _setup(quiet or as_json)
    # The whole request is checked before any model is read.
    r = _build_recipe(ctx, scheme, method, recipe, option, ignore, targets)
    spec = CalibrationSpec(source=calib, num_samples=samples, seq_len=seq_len, seed=seed)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    dev = _check_device(device)
    writes = "folder"
    if export_format:
        from lowbit.export import parse_target

        writes = parse_target(export_format)[0].writes
    data_free = not any(stage.needs for stage in r.build_stages())
    if data_free and not _given(ctx, "calib"):
        spec = None  # data-free: no calibration forward passes unless --calib asks for them
    else:
        documents(spec.source, spec.split)  # an unreadable calibration text fails now (it is cached)
    if not needs_conversion_or_download(model):
        resolve_model(model)  # a local folder: its config is read now, its weights later
    out = check_output(out, overwrite=overwrite, sources=_source_paths(model),
                       need_bytes=_min_output_bytes(model), kind=writes)
    if low_memory:
        from lowbit.memory import serve_large_blocks_with_mmap

        serve_large_blocks_with_mmap()
    qmodel, tokenizer, report = quantize_pretrained(
        model, r, spec, lazy=lazy, batch_size=batch_size, device=dev, progress=progress,
        on_nonfinite="float" if keep_nonfinite_float else "error",
    )
    from lowbit.memory import peak_rss_mb

    report.extra["peak_rss_mb"] = round(peak_rss_mb(), 1)
    report.extra["lazy"] = lazy
    report.extra["low_memory"] = low_memory
    if export_format:
        if export_format.strip().lower() == "gguf" and r.file_type:
            export_format = f"gguf:{r.file_type}"
        path = Path(_export(qmodel, tokenizer, export_format, out, overwrite, model, None, progress).out)
    else:
        path = io.save(qmodel, out, tokenizer=tokenizer, recipe=report.recipe, report=report.to_dict(),
                       overwrite=overwrite)
    summary = {
        "out": str(path), "model": model, "scheme": r.scheme.name(), "method": r.method,
        "layers": len(report.layers), "bits_per_weight": round(report.bits_per_weight, 3),
        "seconds": round(report.seconds, 1), "peak_rss_mb": report.extra["peak_rss_mb"],
        "mean_output_error": report.to_dict()["mean_output_error"],
        "kept_float": list(report.kept_float),
    }
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(
            f"quantized {summary['layers']} layers of {model} with {r.method} {r.scheme.name()} "
            f"({summary['bits_per_weight']} bits/weight) in {summary['seconds']} s, "
            f"peak memory {summary['peak_rss_mb']:.0f} MB"
            + (f", mean output error {report.mean_output_error:.4g}" if report.mean_output_error is not None else "")
            + f" -> {path}",
            highlight=False, markup=False,
        )


def _export(qmodel, tokenizer, target: str, out: Path, overwrite: bool, source_spec: str | None,
            source_file: Path | None, progress: bool):
    """Write an export and print what was written (types, fallbacks, lossy conversions)."""
    import tempfile

    from lowbit.export import export, parse_target
    from lowbit.models.load import source_gguf

    exporter, _ = parse_target(target)
    with tempfile.TemporaryDirectory(prefix="lowbit-gguf-") as scratch:
        gguf_file = source_file
        if exporter.name == "gguf" and gguf_file is None and source_spec:
            gguf_file = source_gguf(source_spec, Path(scratch))
        sources = [source_spec] if source_spec and Path(source_spec).exists() else []
        report = export(qmodel, tokenizer, target, out, overwrite=overwrite, sources=sources,
                        source_gguf=gguf_file)
    if progress:
        for line in report.fallbacks:
            console.print(f"fallback: {line}", highlight=False, markup=False)
        for line in report.lossy:
            console.print(f"lossy: {line}", highlight=False, markup=False)
    return report


@app.command("export")
@friendly
def export_(
    folder: Path = typer.Argument(
        ..., help="a quantized lowbit folder (for gguf:F32/F16/BF16: any float model: bundled name, folder, .gguf)"),
    export_format: str = typer.Option(
        ..., "--format", help="compressed-tensors (vLLM, transformers), gptq, awq, bitsandbytes, or "
        "gguf[:FILE_TYPE] (llama.cpp: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K_S/M/L, Q4_K_S/M, "
        "Q5_K_S/M, Q6_K)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (a .gguf file for gguf)"),
    source: Path | None = typer.Option(
        None, help="gguf: the original model's .gguf file, whose architecture and tokenizer entries are "
        "copied (default: the model the folder was quantized from, when that was a GGUF file)"),
    overwrite: bool = typer.Option(False, help="replace an existing output that lowbit wrote (nothing else)"),
    quiet: bool = typer.Option(False, help="no info lines"),
    as_json: bool = typer.Option(False, "--json", help="print the export report as JSON"),
):
    """Write a quantized lowbit model in a format other engines load."""
    from lowbit import io
    from lowbit.export import check_exportable, parse_target
    from lowbit.outputs import check_output

    progress = _setup(quiet or as_json)
    exporter, variant = parse_target(export_format)
    spec = str(folder)
    if exporter.writes_float(variant) and not (folder.is_dir() and _is_lowbit(folder)):
        from lowbit.models.load import load_model

        check_output(out, overwrite=overwrite, sources=_source_paths(spec), kind=exporter.writes)
        model, tokenizer = load_model(spec, check_finite=True)
        report = _export(model, tokenizer, export_format, out, overwrite, spec, source, progress)
        _print_export(report, as_json)
        return
    check_output(out, overwrite=overwrite, sources=[folder], kind=exporter.writes)
    if exporter.name == "gguf" and variant is None:  # the file type the folder was quantized for
        recipe = io.read_quantization_config(folder).get("recipe") or {}
        if recipe.get("file_type"):
            variant = recipe["file_type"]
            export_format = f"gguf:{variant}"
    qmodel, tokenizer = io.load(folder)
    check_exportable(qmodel, exporter, variant)
    origin = None
    report_file = folder / "lowbit_report.json"
    if report_file.is_file():
        try:
            made = json.loads(report_file.read_text())
            origin = made.get("model_spec") or made.get("model")
        except ValueError:
            origin = None
    report = _export(qmodel, tokenizer, export_format, out, overwrite, origin, source, progress)
    _print_export(report, as_json)


def _print_export(report, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    console.print(f"wrote {report.format} ({report.bits_per_weight:.3f} bits/weight in the linear weights as written, "
                  f"{len(report.fallbacks)} fallbacks) -> {report.out}", highlight=False, markup=False)


def _load_any(spec: str):
    """A lowbit folder, or any model spec the loader accepts (float baseline); either is refused
    if a weight holds NaN or Inf."""
    from lowbit import io
    from lowbit.models.load import load_model

    if Path(spec).is_dir() and _is_lowbit(Path(spec)):
        return io.load(spec)
    if Path(spec).is_dir():
        from lowbit.export import read_checkpoint

        found = read_checkpoint(spec)
        if found is not None:
            return found[0], found[1]
    return load_model(spec, check_finite=True)


def _is_lowbit(folder: Path) -> bool:
    """A folder in lowbit's own format (not an export)."""
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "lowbit"


def _size_row(spec: str, model=None) -> tuple[float, float]:
    """(file size in MB, bits per weight of the quantized linears, NaN for a float model)."""
    from lowbit.contents import inspect_folder, tensor_bytes
    from lowbit.models.load import resolve_model

    path = Path(spec)
    if path.is_dir() and _is_lowbit(path):
        info = inspect_folder(spec)
        return info.file_bytes / 1e6, info.bits_per_weight
    if path.is_file() and path.suffix.lower() == ".gguf":
        from lowbit.contents import gguf_linear_bits

        return path.stat().st_size / 1e6, gguf_linear_bits(path)
    if path.is_dir() and model is not None:
        from lowbit.nn.linear import QuantizedLinear

        layers = [m.qweight for m in model.modules() if isinstance(m, QuantizedLinear)]
        if layers:
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            return size / 1e6, 8.0 * sum(q.nbytes for q in layers) / sum(q.numel for q in layers)
    folder = resolve_model(spec).folder
    sizes = tensor_bytes(Path(folder))
    return sum(sizes.values()) / 1e6, float("nan")


@app.command("eval")
@friendly
def eval_(
    model: list[str] = typer.Argument(..., help="one or more quantized models: lowbit, compressed-tensors, "
                                      "GPTQ, AWQ or bitsandbytes folders, .gguf files (or any model spec)"),
    baseline: str = typer.Option(..., help="the original model (bundled name, folder, .gguf or hub id)"),
    source: str = typer.Option(defaults.EVAL_SOURCE, help="evaluation text (its evaluation split)"),
    tokens: int = typer.Option(defaults.EVAL_TOKENS, help="evaluation tokens (whole windows)"),
    window: int = typer.Option(defaults.EVAL_WINDOW, help="tokens per window"),
    stride: int | None = typer.Option(
        None, help="window stride (default: the window; smaller scores with extra context)"),
    runtime: str = typer.Option(
        "torch", help="torch (dequantized weights), or llama.cpp: also score each .gguf file as llama.cpp runs "
        "it (top-10 KL and top-1 agreement, needs the xllamacpp wheel)"),
    quiet: bool = typer.Option(False, help="no progress bars or info logs"),
    as_json: bool = typer.Option(False, "--json", help="print the same content as JSON"),
):
    """Measure each MODEL against --baseline on the same tokens: size, bits/weight, perplexity,
    KL divergence, top-1, in one table.

    A MODEL may be a lowbit folder, a compressed-tensors, GPTQ, AWQ or bitsandbytes folder (read
    into lowbit with the same codes, whoever wrote it), a .gguf file of any type (its dequantized
    weights), or a float model."""
    from lowbit.data.calibration import evaluation_tokens
    from lowbit.data.text import documents
    from lowbit.eval.metrics import check_window, compare_models, config_differences

    progress = _setup(quiet or as_json)
    check_window(window, stride)
    if tokens < 2:
        raise ConfigError(f"--tokens must be at least 2, got {tokens}")
    if runtime not in ("torch", "llama.cpp"):
        raise ConfigError(f"--runtime must be torch or llama.cpp, got {runtime!r}")
    if runtime == "llama.cpp" and not any(m.lower().endswith(".gguf") for m in model):
        raise ConfigError("--runtime llama.cpp scores .gguf files; export one with `lowbit export --format gguf`")
    documents(source, "evaluation")  # an unreadable text fails before the models load
    ref, ref_tokenizer = _load_any(baseline)
    ids = evaluation_tokens(ref_tokenizer, source=source, max_tokens=tokens)
    b_mb, _ = _size_row(baseline)
    rows, cpp_rows = [], []
    for spec in model:
        qmodel, _ = _load_any(spec)
        differences = config_differences(qmodel, ref)
        if differences:
            err_console.print(
                f"warning: {spec} and {baseline} differ in architecture ({'; '.join(differences[:4])}): "
                "the baseline is not the model it was quantized from, so the scores compare unrelated models",
                highlight=False, markup=False, soft_wrap=True,
            )
        r = compare_models(qmodel, ref, ids, window=window, stride=stride, progress=progress)
        q_mb, q_bits = _size_row(spec, qmodel)
        if not rows:
            rows.append({"model": baseline, "size_mb": round(b_mb, 2), "bits_per_weight": None,
                         "perplexity": round(r.reference_perplexity, 4), "ppl_change_pct": 0.0,
                         "mean_kl": 0.0, "p99_kl": 0.0, "top1_agreement": 1.0})
        rows.append({"model": spec, "size_mb": round(q_mb, 2), "bits_per_weight": round(q_bits, 3),
                     "perplexity": round(r.perplexity, 4), "ppl_change_pct": round(r.perplexity_change_pct, 3),
                     "mean_kl": round(r.mean_kl, 5), "p99_kl": round(r.p99_kl, 5),
                     "top1_agreement": round(r.top1_agreement, 4)})
        del qmodel
        if runtime == "llama.cpp" and spec.lower().endswith(".gguf"):
            from lowbit.eval.llamacpp import compare_with_llamacpp, llamacpp_server, model_logprobs

            first = ids.flatten()[: min(window, r.num_scored + 1)].tolist()
            with llamacpp_server(spec, n_ctx=max(512, len(first) + 8)) as server:
                cpp = compare_with_llamacpp(server, model_logprobs(ref, first), first)
            cpp_rows.append({"model": spec, **{k: round(v, 5) if isinstance(v, float) else v
                                              for k, v in cpp.to_dict().items()}})
    result = {"tokens_scored": r.num_scored, "window": r.window, "stride": r.stride, "source": source, "rows": rows}
    if cpp_rows:
        result["llama_cpp"] = cpp_rows
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=escape(f"fidelity on {r.num_scored} {source} tokens (window {r.window}, stride {r.stride})"))
    for col in ("model", "size MB", "bits/weight", "perplexity", "ppl change", "mean KL", "KL p99", "top-1"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in rows:
        table.add_row(
            escape(row["model"]), f"{row['size_mb']:.1f}",
            "float" if row["bits_per_weight"] is None else f"{row['bits_per_weight']:.2f}",
            f"{row['perplexity']:.3f}", f"{row['ppl_change_pct']:+.2f}%", f"{row['mean_kl']:.4f}",
            f"{row['p99_kl']:.4f}", f"{row['top1_agreement']:.3f}",
        )
    console.print(table)
    for c in cpp_rows:
        console.print(
            f"llama.cpp running {c['model']} on the first {c['positions']} positions: top-{c['k']} KL against "
            f"the baseline {c['top_k_kl']:.4f}, top-1 agreement {c['top1_agreement']:.3f} (restricted to "
            f"llama.cpp's top {c['k']} tokens; compare with the dequantized weights' mean KL above)",
            highlight=False, markup=False, soft_wrap=True)


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
    table = Table(title=escape(f"{folder}: {len(info.layers)} quantized layers"))
    for col in ("layer", "format", "block", "zero point", "shape", "KB", "bits/weight", "activations"):
        table.add_column(col, justify="left" if col in ("layer", "format", "activations") else "right")
    for layer in info.layers:
        table.add_row(
            escape(layer.name), layer.format, "x".join(map(str, layer.block_size)), layer.zero_point or "-",
            "x".join(map(str, layer.shape)), f"{layer.bytes / 1e3:.1f}", f"{layer.bits_per_weight:.3f}",
            layer.activations(),
        )
    console.print(table)
    console.print(
        f"quantized layers: {info.quantized_params:,} weights in {info.quantized_bytes / 1e6:.2f} MB "
        f"({info.bits_per_weight:.3f} bits/weight); other tensors {info.other_bytes / 1e6:.2f} MB; "
        f"total {info.file_bytes / 1e6:.2f} MB",
        highlight=False,
    )
    stages = [s.get("name") for s in (info.recipe or {}).get("stages") or []]
    if stages:
        console.print(f"stages: {' -> '.join(stages)}", highlight=False, markup=False)


@app.command()
@friendly
def compare(
    model: str = typer.Argument(..., help="bundled name, HF folder, .gguf file or hub id"),
    methods: str = typer.Option("rtn,hqq,gptq,awq", help="comma-separated methods, e.g. rtn,gptq,awq+gptq"),
    scheme: str = typer.Option("w4g128", help="comma-separated schemes, e.g. w4g128,w3g128"),
    calib: str = typer.Option(defaults.CALIBRATION_SOURCE, help="calibration text (shared by every method)"),
    samples: int = typer.Option(defaults.CALIBRATION_SAMPLES, help="calibration samples"),
    seq_len: int = typer.Option(defaults.CALIBRATION_SEQ_LEN, help="tokens per calibration sample"),
    seed: int = typer.Option(defaults.CALIBRATION_SEED, help="calibration sampling seed"),
    source: str = typer.Option(defaults.EVAL_SOURCE, help="evaluation text (its evaluation split)"),
    tokens: int = typer.Option(defaults.EVAL_TOKENS, help="evaluation tokens"),
    window: int = typer.Option(defaults.EVAL_WINDOW, help="tokens per evaluation window"),
    keep: Path | None = typer.Option(None, help="keep the quantized models in this folder"),
    quiet: bool = typer.Option(False, help="no progress bars or info logs"),
    as_json: bool = typer.Option(False, "--json", help="print the same content as JSON"),
):
    """Quantize MODEL with several methods on the same data, each in its own process, and print
    one table: size, time, peak memory, layer output error and fidelity to MODEL."""
    from lowbit.compare import compare_methods, rows_to_dicts
    from lowbit.data.calibration import CalibrationSpec

    progress = _setup(quiet or as_json)
    spec = CalibrationSpec(source=calib, num_samples=samples, seq_len=seq_len, seed=seed)
    rows, meta = compare_methods(
        model, _split(scheme), _split(methods), spec, source=source, tokens=tokens, window=window,
        keep=keep, progress=progress,
    )
    if as_json:
        print(json.dumps({**meta, "rows": rows_to_dicts(rows)}, indent=2))
        return
    table = Table(title=f"{model}: {meta['tokens_scored']} {source} tokens, baseline perplexity "
                        f"{meta['baseline_perplexity']:.3f}; calibration {samples} x {seq_len} {calib}")
    for col in ("scheme", "method", "bits/weight", "MB", "time s", "peak MB", "output error",
                "perplexity", "ppl change", "mean KL", "KL p99", "top-1"):
        table.add_column(col, justify="left" if col in ("scheme", "method") else "right")
    for r in rows:
        output_error = "-" if r.output_error is None else f"{r.output_error:.2e}"
        table.add_row(r.scheme, r.method, f"{r.bits_per_weight:.3f}", f"{r.quantized_mb:.1f}",
                      f"{r.seconds:.1f}", f"{r.peak_rss_mb:.0f}", output_error, f"{r.perplexity:.3f}",
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
