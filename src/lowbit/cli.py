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
    baseline: str | None = typer.Option(
        None, help="the original model (bundled name, folder, .gguf or hub id); optional with --tasks"),
    tasks: str | None = typer.Option(
        None, help="task accuracy too (without --baseline: only that), comma-separated: mmlu, cmmlu, ceval, "
        "hellaswag, arc_easy, arc_challenge, piqa, winogrande, lambada"),
    limit: int | None = typer.Option(None, help="--tasks: items per task (a deterministic subset; default all)"),
    shots: int | None = typer.Option(None, help="--tasks: few-shot examples per item (default 0)"),
    batch_size: int = typer.Option(8, help="--tasks: contexts per forward pass"),
    task_data: str | None = typer.Option(
        None, help="--tasks: folder holding ceval/ and cmmlu/ (or set LOWBIT_TASK_DATA)"),
    seed: int = typer.Option(defaults.TASK_SEED, help="--tasks: seed of the --limit subset and of the shots"),
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
    KL divergence, top-1, in one table; with --tasks, also task accuracy (log-likelihood) of each
    model (and of the baseline), on the same items.

    A MODEL may be a lowbit folder, a compressed-tensors, GPTQ, AWQ or bitsandbytes folder (read
    into lowbit with the same codes, whoever wrote it), a .gguf file of any type (its dequantized
    weights), or a float model."""
    from lowbit.data.calibration import evaluation_tokens
    from lowbit.data.text import documents
    from lowbit.eval.metrics import check_window, compare_models, config_differences

    progress = _setup(quiet or as_json)
    task_settings = _task_settings(tasks, baseline, limit, shots, batch_size, task_data, seed)
    if baseline is None:
        _print_tasks(_run_tasks(model, task_settings, progress), as_json)
        return
    check_window(window, stride)
    if tokens < 2:
        raise ConfigError(f"--tokens must be at least 2, got {tokens}")
    if runtime not in ("torch", "llama.cpp"):
        raise ConfigError(f"--runtime must be torch or llama.cpp, got {runtime!r}")
    if runtime == "llama.cpp" and not any(m.lower().endswith(".gguf") for m in model):
        raise ConfigError("--runtime llama.cpp scores .gguf files; export one with `lowbit export --format gguf`")
    documents(source, "evaluation")  # an unreadable text fails before the models load
    task_runs = _run_tasks([baseline, *model], task_settings, progress) if task_settings else None
    if task_runs and not as_json:
        _print_tasks(task_runs, False)
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
    result = {"kind": "eval", "tokens_scored": r.num_scored, "window": r.window, "stride": r.stride,
              "source": source, "rows": rows}
    if cpp_rows:
        result["llama_cpp"] = cpp_rows
    if as_json:
        print(json.dumps(result if task_runs is None else {**_tasks_json(task_runs), "fidelity": result}, indent=2))
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


def _task_settings(tasks, baseline, limit, shots, batch_size, task_data, seed) -> dict | None:
    """The --tasks request of `lowbit eval`, validated before any model loads (None without --tasks)."""
    if tasks is None:
        if baseline is None:
            raise ConfigError("give --baseline ORIGINAL (fidelity) or --tasks mmlu,... (task accuracy), or both")
        return None
    from lowbit.eval.tasks import check_tasks

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if shots is not None and shots < 0:
        raise ConfigError(f"--shots must be 0 or more, got {shots}")
    names = check_tasks(_split(tasks), data_dir=task_data, check_data=True)
    return {"tasks": names, "limit": limit, "shots": shots, "batch_size": batch_size, "data_dir": task_data,
            "seed": seed}


def _run_tasks(specs: list[str], settings: dict, progress: bool) -> list[tuple[str, list]]:
    """(model spec, its TaskResults) for each model, loaded one at a time."""
    from lowbit.eval.tasks import evaluate

    runs = []
    for spec in specs:
        m, tokenizer = _load_any(spec)
        runs.append((spec, evaluate(m, tokenizer, progress=progress, **settings)))
        del m
    return runs


def _tasks_json(runs: list[tuple[str, list]]) -> dict:
    """{"kind": "tasks", "model", "results"} for one model; several add "runs" (one per model)."""
    out = {"kind": "tasks", "model": runs[0][0], "results": [r.to_dict() for r in runs[0][1]]}
    if len(runs) > 1:
        out["runs"] = [{"model": spec, "results": [r.to_dict() for r in results]} for spec, results in runs]
    return out


def _print_tasks(runs: list[tuple[str, list]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(_tasks_json(runs), indent=2))
        return
    table = Table(title="task accuracy (log-likelihood; % ± standard error)")
    for col in ("task", "shots", "n", "metric"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for spec, _ in runs:
        table.add_column(escape(spec), justify="right")
    for i, first in enumerate(runs[0][1]):
        cells = [f"{100 * results[i].accuracy:.1f} ± {100 * results[i].stderr:.1f}" for _, results in runs]
        table.add_row(first.task, str(first.shots), str(first.n), first.metric, *cells)
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
    keep: Path | None = typer.Option(None, help="keep the quantized models in this folder, with the result in "
                                     "compare.json (the input of `lowbit report`)"),
    quiet: bool = typer.Option(False, help="no progress bars or info logs"),
    as_json: bool = typer.Option(False, "--json", help="print the same content as JSON"),
):
    """Quantize MODEL with several methods on the same data, each in its own process, and print
    one table: size, time, peak memory, layer output error and fidelity to MODEL."""
    from lowbit.compare import compare_methods, compare_result
    from lowbit.data.calibration import CalibrationSpec

    progress = _setup(quiet or as_json)
    spec = CalibrationSpec(source=calib, num_samples=samples, seq_len=seq_len, seed=seed)
    rows, meta = compare_methods(
        model, _split(scheme), _split(methods), spec, source=source, tokens=tokens, window=window,
        keep=keep, progress=progress,
    )
    if as_json:
        print(json.dumps(compare_result(rows, meta), indent=2))
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
def chat(
    model: str = typer.Argument(
        ..., help="the quantized model: a lowbit folder, an export, a .gguf file or any model spec"),
    baseline: str = typer.Option(..., help="the original model (bundled name, folder, .gguf or hub id)"),
    max_new_tokens: int = typer.Option(defaults.CHAT_MAX_NEW_TOKENS, help="greedy tokens per answer"),
    timeout: float = typer.Option(defaults.CHAT_CODE_TIMEOUT, help="seconds each coding answer may run in the sandbox"),
    kernel: str = typer.Option(
        "cached", help="kernel of the quantized layers while answering: cached (default) keeps the dequantized "
        "weights, the numbers of dequant at float speed; any `lowbit bench --kernel` name"),
    quiet: bool = typer.Option(False, help="no progress bars or info logs"),
    as_json: bool = typer.Option(False, "--json", help="print the same content as JSON"),
):
    """Answer a fixed set of prompts (English and Chinese, a fact, formats to follow, code to run)
    with --baseline and MODEL by greedy decoding, and show the answers side by side: the tokens
    they share and each answer's checks (see docs/evaluation.md, Chat checks)."""
    from lowbit.eval.chat import CHAT_FORMAT_VERSION, compare_answers, generate_answers

    progress = _setup(quiet or as_json)
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not timeout > 0:
        raise ConfigError(f"--timeout must be a positive number of seconds, got {timeout}")
    from lowbit.nn import get_kernel, set_kernel

    get_kernel(kernel)  # an unknown name fails before any model loads
    ref, ref_tokenizer = _load_any(baseline)
    baseline_answers = generate_answers(ref, ref_tokenizer, max_new_tokens=max_new_tokens, progress=progress)
    del ref
    qmodel, tokenizer = _load_any(model)
    set_kernel(qmodel, kernel, fallback="dequant")
    answers = generate_answers(qmodel, tokenizer, max_new_tokens=max_new_tokens, progress=progress)
    del qmodel
    results = compare_answers(baseline_answers, answers, timeout=timeout)
    if as_json:
        print(json.dumps({"kind": "chat", "model": model, "baseline": baseline, "max_new_tokens": max_new_tokens,
                          "prompt_version": CHAT_FORMAT_VERSION, "prompts": [r.to_dict() for r in results]},
                         indent=2, ensure_ascii=False))
        return
    _print_chat(results, model, baseline)


def _print_chat(results, model: str, baseline: str) -> None:
    """The answers side by side where the terminal is wide enough, else one after the other."""
    def marks(checks: dict) -> str:
        return "\n".join(f"{name}: {'yes' if checks['baseline'][name] else 'no'} / "
                         f"{'yes' if checks['model'][name] else 'no'}" for name in checks["baseline"])

    if console.width >= 140:
        table = Table(title=escape(f"{model} against {baseline}: greedy answers"), show_lines=True, expand=True)
        for col, ratio in (("prompt", 2), ("baseline", 4), ("model", 4), ("same tokens", 1),
                           ("checks (baseline / model)", 2)):
            table.add_column(col, ratio=ratio, justify="right" if col == "same tokens" else "left")
        for r in results:
            table.add_row(escape(f"{r.id}: {r.prompt}"), escape(r.baseline_answer), escape(r.answer),
                          f"{r.common_prefix_tokens} of {max(r.baseline_tokens, r.tokens)}",
                          escape(marks(r.checks)))
        console.print(table)
    else:
        for r in results:
            console.rule(escape(r.id))
            console.print(r.prompt, highlight=False, markup=False)
            console.print("[bold]baseline:[/bold] " + escape(r.baseline_answer), highlight=False)
            console.print("[bold]model:[/bold] " + escape(r.answer), highlight=False)
            console.print(f"same first tokens: {r.common_prefix_tokens} of {max(r.baseline_tokens, r.tokens)}",
                          highlight=False)
            if r.checks["baseline"]:
                console.print("checks (baseline / model): " + escape(marks(r.checks).replace("\n", ", ")),
                              highlight=False)
    agree = sum(r.first16_match for r in results)
    console.print(f"first 16 tokens agree on {agree}/{len(results)} prompts; mean shared prefix "
                  f"{sum(r.common_prefix_tokens for r in results) / len(results):.1f} tokens", highlight=False)
    names = list(dict.fromkeys(name for r in results for name in r.checks["baseline"]))
    for name in names:
        counted = [r for r in results if name in r.checks["baseline"]]
        console.print(f"{name}: baseline {sum(r.checks['baseline'][name] for r in counted)}/{len(counted)}, "
                      f"model {sum(r.checks['model'][name] for r in counted)}/{len(counted)}", highlight=False)

@app.command()
@friendly
def bench(
    model: list[str] = typer.Argument(..., help="models to measure: lowbit folders, exports, .gguf files or any "
                                      "model spec"),
    baseline: str | None = typer.Option(
        None, help="the float model the ratios are to (default: the source model the lowbit folders record)"),
    prompt_tokens: int = typer.Option(defaults.BENCH_PROMPT_TOKENS, help="prompt tokens per sequence"),
    decode_tokens: int = typer.Option(defaults.BENCH_DECODE_TOKENS, help="greedy tokens generated per sequence"),
    batch_sizes: str = typer.Option(",".join(map(str, defaults.BENCH_BATCH_SIZES)), help="comma-separated batch sizes"),
    repeats: int = typer.Option(defaults.BENCH_REPEATS, help="timed runs per figure (median, after a warm-up)"),
    threads: int | None = typer.Option(None, help="torch threads (default: torch's default here)"),
    kernel: str | None = typer.Option(
        None, help="kernel of the quantized layers: dequant, int8, int8-bf16, int4, int4-bf16 or cached (a layer "
        "it cannot run uses dequant); default: as loaded (dequant)"),
    quiet: bool = typer.Option(False, help="no progress bars or info logs"),
    as_json: bool = typer.Option(False, "--json", help="print the same content as JSON"),
):
    """Load time, resident memory, prefill and decode tokens/s at each batch size and time to first
    token of each MODEL and the float --baseline, each measured in a fresh process, each as a ratio
    to the baseline measured in the same run."""
    from lowbit.eval.bench import BenchSettings, bench_models, recorded_baseline, settings_record

    progress = _setup(quiet or as_json)
    try:
        sizes = tuple(int(b) for b in _split(batch_sizes))
    except ValueError:
        raise ConfigError(f"--batch-sizes takes comma-separated integers, e.g. 1,8; got {batch_sizes!r}") from None
    settings = BenchSettings(prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, batch_sizes=sizes,
                             repeats=repeats, threads=threads, kernel=kernel)
    if kernel is not None:
        from lowbit.nn import get_kernel

        get_kernel(kernel)  # an unknown name fails before any model loads
    if baseline is None:
        recorded = {spec: recorded_baseline(spec) for spec in model}
        missing = [spec for spec, source in recorded.items() if source is None]
        if missing:
            raise ConfigError(f"{missing[0]} records no source model (only lowbit folders do); name the float "
                              "model with --baseline, e.g. --baseline smollm2-135m")
        sources = sorted(set(recorded.values()))
        if len(sources) > 1:
            raise ConfigError(f"the models were quantized from different sources ({', '.join(sources)}); "
                              "name the float model with --baseline")
        baseline = next(iter(recorded.values()))
    rows, used = bench_models(model, baseline, _load_any, settings, progress=progress)
    if as_json:
        print(json.dumps({"kind": "bench", "baseline": baseline, "rows": [r.to_dict() for r in rows],
                          "settings": settings_record(used)}, indent=2))
        return
    console.print(f"{used.threads} torch threads, torch {settings_record(used)['torch']}; prompts {used.prompt_tokens} "
                  f"tokens of {used.source}, {used.decode_tokens} generated tokens, median of {used.repeats} "
                  "after a warm-up; (x) is the ratio to the baseline", highlight=False)
    table = Table(title=escape(f"speed and memory against {baseline}"))
    columns = ["model", "kernels", "load s", "RSS MB", "weights MB"]
    for b in used.batch_sizes:
        columns += [f"TTFT ms b{b}", f"prefill tok/s b{b}", f"decode tok/s b{b}"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "kernels") else "right")
    for r in rows:
        x = r.ratios
        cells = [escape(r.model), ", ".join(f"{k} {n}" for k, n in r.kernels.items()) or "float",
                 f"{r.load_seconds:.2f} ({x['load_seconds']:.2f})", f"{r.rss_mb:.0f} ({x['rss_mb']:.2f})",
                 f"{r.weight_mb:.0f} ({x['weight_mb']:.2f})"]
        for s in r.speeds:
            cells += [f"{s.ttft_seconds * 1e3:.0f} ({x[f'ttft_b{s.batch}']:.2f})",
                      f"{s.prefill_tokens_per_s:.0f} ({x[f'prefill_b{s.batch}']:.2f})",
                      f"{s.decode_tokens_per_s:.1f} ({x[f'decode_b{s.batch}']:.2f})"]
        table.add_row(*cells)
    console.print(table)

@app.command()
@friendly
def report(
    runs: list[str] = typer.Argument(..., help="`lowbit compare --keep` folders, quantized lowbit folders, or "
                                     "JSON files saved from --json (tasks, validate, bench, chat, compare, eval, "
                                     "harness)"),
    out: Path = typer.Option(Path("report.html"), help="the HTML page; the Markdown summary goes beside it (.md)"),
    peers: Path | None = typer.Option(None, help="other tools' points for the size-versus-KL plot: JSON or CSV of "
                                      "name, bits (or size_mb), kl"),
    baseline: str | None = typer.Option(None, help="the float model: adds the worst layers' float weights and "
                                        "input activations against their quantization ranges"),
    worst: int = typer.Option(3, help="layers shown in the histograms (largest error first)"),
    source: str = typer.Option(defaults.EVAL_SOURCE, help="--baseline: text whose evaluation split feeds the "
                               "activations"),
    activation_tokens: int = typer.Option(256, help="--baseline: tokens read to capture activations"),
    quiet: bool = typer.Option(False, help="no info logs"),
    as_json: bool = typer.Option(False, "--json", help="print what was written as JSON"),
):
    """One self-contained HTML page (and a Markdown summary) on quantized runs: the table of runs,
    size against KL divergence, per-layer error heatmaps, the worst layers' weights and
    activations against their ranges, and chat answers side by side."""
    from lowbit.report import build_report, collect, read_peers, write_report

    _setup(quiet or as_json)
    if worst < 0:
        raise ConfigError(f"--worst must be 0 or more, got {worst}")
    if activation_tokens < 2:
        raise ConfigError(f"--activation-tokens must be at least 2, got {activation_tokens}")
    collection = collect(runs)
    peer_points = read_peers(peers) if peers is not None else None
    float_model = _load_any(baseline) if baseline is not None else None
    built = build_report(collection, peers=peer_points, baseline=float_model, worst=worst, source=source,
                         activation_tokens=activation_tokens)
    files = write_report(built, out)
    if as_json:
        print(json.dumps({"kind": "report", "html": str(files.html), "markdown": str(files.markdown),
                          "figures": files.figures, "runs": len(collection.runs)}, indent=2))
        return
    console.print(f"wrote {files.html} ({files.figures} figures, {len(collection.runs)} runs) and {files.markdown}",
                  highlight=False, markup=False)

@app.command()
@friendly
def validate(
    model: str = typer.Argument(..., help="the quantized model (any form `lowbit eval` reads)"),
    baseline: str = typer.Option(..., help="the original model (bundled name, folder, .gguf or hub id)"),
    tasks: str = typer.Option(defaults.VALIDATE_TASKS, help="comma-separated tasks (see `lowbit eval --help`)"),
    budget: str = typer.Option(defaults.BUDGET, help="largest relative accuracy loss accepted, e.g. 2% or 0.02"),
    limit: int | None = typer.Option(None, help="items per task (a deterministic subset; default: all)"),
    shots: int | None = typer.Option(None, help="few-shot examples per item (default: each task's own)"),
    seed: int = typer.Option(defaults.TASK_SEED, help="seed of the --limit subset and of the shots"),
    batch_size: int = typer.Option(8, help="requests per forward pass"),
    task_data: str | None = typer.Option(None, help="folder with ceval/ and cmmlu/ (or set LOWBIT_TASK_DATA)"),
    tokens: int = typer.Option(defaults.EVAL_TOKENS, help="evaluation-text tokens for KL and perplexity (0: skip)"),
    cache: bool = typer.Option(True, help="reuse the baseline's cached task results (same weights and settings)"),
    quiet: bool = typer.Option(False, help="no progress bars or info logs"),
    as_json: bool = typer.Option(False, "--json", help="print the same content as JSON"),
):
    """Score MODEL and --baseline on identical task items and gate on the accuracy budget.

    Per task: both accuracies with standard errors, the change, recovery, the paired standard
    error and McNemar's p on the same items, and a verdict. Exit status 1 when a task loses more
    than the budget beyond noise (one-sided 95%), 0 otherwise, so it can gate a deployment."""
    from lowbit.data.calibration import evaluation_tokens
    from lowbit.eval.metrics import compare_models
    from lowbit.eval.tasks import check_tasks
    from lowbit.eval.validate import compare_results, default_cache, evaluate_cached, parse_budget

    progress = _setup(quiet or as_json)
    beta = parse_budget(budget)
    names = check_tasks(_split(tasks), data_dir=task_data)
    settings = {"shots": shots, "limit": limit, "seed": seed, "batch_size": batch_size, "data_dir": task_data}
    store = default_cache() if cache else None
    ref, ref_tokenizer = _load_any(baseline)
    base_results, cached = evaluate_cached(ref, ref_tokenizer, names, store, progress=progress, **settings)
    if cached and not as_json:
        err_console.print(f"baseline results read from the cache: {', '.join(cached)}", highlight=False)
    qmodel, tokenizer = _load_any(model)
    q_results, _ = evaluate_cached(qmodel, tokenizer, names, None, progress=progress, **settings)
    rows = [compare_results(b, q, beta) for b, q in zip(base_results, q_results)]
    fidelity = None
    if tokens > 0:
        ids = evaluation_tokens(ref_tokenizer, source=defaults.EVAL_SOURCE, max_tokens=max(tokens, 2))
        r = compare_models(qmodel, ref, ids, window=min(defaults.EVAL_WINDOW, ids.numel()), progress=progress)
        fidelity = {"tokens_scored": r.num_scored, "baseline_perplexity": r.reference_perplexity,
                    "perplexity": r.perplexity, "ppl_change_pct": r.perplexity_change_pct,
                    "mean_kl": r.mean_kl, "top1_agreement": r.top1_agreement}
    failed = [row.task for row in rows if row.verdict == "fail"]
    if as_json:
        print(json.dumps({"kind": "validate", "model": model, "baseline": baseline, "budget": beta,
                          "passed": not failed, "tasks": [row.to_dict() for row in rows],
                          "fidelity": fidelity, "settings": settings}, indent=2))
    else:
        _print_validation(model, baseline, beta, rows, fidelity, failed)
    if failed:
        raise typer.Exit(1)


def _print_validation(model, baseline, beta, rows, fidelity, failed) -> None:
    table = Table(title=escape(f"{model} against {baseline}: same items, budget {100 * beta:g}% relative"))
    for col in ("task", "n", "metric", "baseline", "quantized", "change", "relative", "recovery",
                "paired se", "McNemar p", "verdict"):
        table.add_column(col, justify="left" if col in ("task", "metric", "verdict") else "right")
    for r in rows:
        table.add_row(
            r.task, str(r.n), r.metric, f"{100 * r.baseline_accuracy:.1f} ± {100 * r.baseline_stderr:.1f}",
            f"{100 * r.accuracy:.1f} ± {100 * r.stderr:.1f}", f"{100 * r.change:+.1f}",
            f"{100 * r.relative_change:+.1f}%", f"{r.recovery:.1f}%", f"{100 * r.paired_stderr:.1f}",
            f"{r.p_value:.3f}", {"pass": "pass", "noise": "over budget, within noise", "fail": "FAIL"}[r.verdict],
        )
    console.print(table)
    if fidelity is not None:
        console.print(
            f"fidelity on {fidelity['tokens_scored']} {defaults.EVAL_SOURCE} tokens: perplexity "
            f"{fidelity['baseline_perplexity']:.3f} -> {fidelity['perplexity']:.3f} "
            f"({fidelity['ppl_change_pct']:+.2f}%), mean KL {fidelity['mean_kl']:.4f}, "
            f"top-1 {fidelity['top1_agreement']:.3f}", highlight=False, markup=False)
    if failed:
        console.print(f"FAIL: {', '.join(failed)} lose more than {100 * beta:g}% beyond noise (exit status 1)",
                      highlight=False, markup=False)
    else:
        console.print(f"pass: no task loses more than {100 * beta:g}% beyond noise", highlight=False,
                      markup=False)


@app.command()
@friendly
def harness(
    model: str = typer.Argument(..., help="the model: any form `lowbit eval` reads (lowbit folder, export, "
                                "GGUF file, bundled name, HF folder)"),
    tasks: str | None = typer.Option(
        None, help="comma-separated lm-eval tasks or groups (their data from the hub), or tasks defined in "
        "--include-path"),
    include_path: Path | None = typer.Option(None, help="a folder of lm-eval task YAML files (local tasks)"),
    lowbit_tasks: str | None = typer.Option(
        None, help="lowbit's tasks (arc_easy, mmlu, ...; see `lowbit eval --help`) run through lm-eval as local "
        "task files, offline, each compared with lowbit's own scorer on the same items"),
    limit: int | None = typer.Option(None, help="documents per task (lm-eval: the first N; --lowbit-tasks: "
                                     "lowbit's deterministic subset)"),
    shots: int | None = typer.Option(None, help="few-shot examples (default: each task's own)"),
    seed: int = typer.Option(defaults.TASK_SEED, help="--lowbit-tasks: seed of the subset and shots; lm-eval: "
                             "of its few-shot sampler"),
    batch_size: int = typer.Option(8, help="requests per forward pass"),
    task_data: str | None = typer.Option(None, help="--lowbit-tasks: folder with ceval/ and cmmlu/ "
                                         "(or set LOWBIT_TASK_DATA)"),
    quiet: bool = typer.Option(False, help="no progress bars or info logs"),
    as_json: bool = typer.Option(False, "--json", help="print the same content as JSON"),
):
    """Run lm-evaluation-harness tasks on MODEL (lm-eval's HFLM around lowbit's model object).

    With a hub, --tasks names any lm-eval task. Offline, --include-path gives local task files,
    and --lowbit-tasks runs lowbit's task items through lm-eval and prints both scorers'
    accuracy on the same items (they agree to float rounding). Needs `pip install lowbit[harness]`."""
    import tempfile

    from lowbit.eval.harness import check_agreement, run_harness
    from lowbit.eval.tasks import check_tasks

    progress = _setup(quiet or as_json)
    if not tasks and not lowbit_tasks:
        raise ConfigError("name tasks: --tasks for lm-eval's (or --include-path ones), --lowbit-tasks for lowbit's")
    names = check_tasks(_split(lowbit_tasks), data_dir=task_data) if lowbit_tasks else []
    qmodel, tokenizer = _load_any(model)
    results = []
    if tasks:
        results = run_harness(qmodel, tokenizer, _split(tasks), include_path=include_path, limit=limit,
                              num_fewshot=shots, batch_size=batch_size, fewshot_seed=seed, progress=progress)
    agreements = []
    if names:
        with tempfile.TemporaryDirectory(prefix="lowbit-harness-") as folder:
            agreements = [check_agreement(qmodel, tokenizer, name, folder, shots=shots, limit=limit, seed=seed,
                                          data_dir=task_data, batch_size=batch_size, progress=progress)
                          for name in names]
    if as_json:
        print(json.dumps({"kind": "harness", "model": model, "results": [r.to_dict() for r in results],
                          "agreement": [a.to_dict() for a in agreements]}, indent=2))
        return
    if results:
        table = Table(title=escape(f"{model}: lm-eval tasks"))
        for col in ("task", "n", "shots", "metric", "value", "stderr"):
            table.add_column(col, justify="left" if col in ("task", "metric") else "right")
        for r in results:
            for metric, value in r.metrics.items():
                se = r.stderr.get(metric)
                table.add_row(escape(r.task), "-" if r.n is None else str(r.n),
                              "-" if r.num_fewshot is None else str(r.num_fewshot), escape(metric),
                              f"{value:.4f}", "-" if se is None else f"{se:.4f}")
        console.print(table)
    if agreements:
        table = Table(title=escape(f"{model}: lowbit's scorer and lm-eval on the same items"))
        for col in ("task", "n", "metric", "lowbit", "lm-eval", "stderr", "max |Δ loglik|", "items differing"):
            table.add_column(col, justify="left" if col in ("task", "metric") else "right")
        for a in agreements:
            table.add_row(a.task, str(a.n), a.metric, f"{a.lowbit_accuracy:.4f}", f"{a.harness_accuracy:.4f}",
                          f"{a.stderr:.4f}", f"{a.max_loglik_difference:.1e}", str(len(a.disagreeing_items)))
        console.print(table)


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
