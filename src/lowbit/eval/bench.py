"""Load time, memory and speed of models, each as a ratio to the float model measured in the same run.

Every model is measured in a fresh process of its own (``compare.run_in_process``), so one
model's memory never shows in another's figures, with the same thread count. Per model:

- ``load_seconds``: loading it, ready to run (the chosen kernel prepared);
- ``rss_mb``: resident memory (VmRSS) after loading minus before, in MB (1e6 bytes);
  ``weight_mb``: the bytes of its parameters and buffers (tied tensors once);
  ``peak_rss_mb``: the process's peak at the end, inference included;
- for each batch size b, on b windows of ``prompt_tokens`` evaluation-text tokens:
  prefill tokens/s ``b * prompt_tokens / t_prefill`` (one forward pass, logits of the last
  position only); time to first token ``t_first`` (greedy generation of one token: the prefill
  plus the first token); decode tokens/s ``b * (decode_tokens - 1) / (t_gen - t_first)``, with
  ``t_gen`` the greedy generation of exactly ``decode_tokens`` tokens with the KV cache.

Each time is the median of ``repeats`` runs after one warm-up. A ratio is model / baseline:
above 1 is more memory or time for memory and latency, faster for tokens/s.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowbit import defaults
from lowbit.compare import REPORT_FILE, run_in_process
from lowbit.errors import ConfigError
from lowbit.memory import resident_mb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = defaults.BENCH_PROMPT_TOKENS
    decode_tokens: int = defaults.BENCH_DECODE_TOKENS
    batch_sizes: tuple[int, ...] = defaults.BENCH_BATCH_SIZES
    repeats: int = defaults.BENCH_REPEATS
    threads: int | None = None
    """torch threads in every measuring process; None: this process's ``torch.get_num_threads()``."""
    kernel: str | None = None
    """Kernel of the quantized layers (``lowbit.nn.set_kernel``, falling back to ``dequant``);
    None: as loaded."""
    source: str = defaults.EVAL_SOURCE
    """Text of the prompts (its evaluation split)."""

    def __post_init__(self):
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        for name, least in (("prompt_tokens", 1), ("decode_tokens", 2), ("repeats", 1)):
            if getattr(self, name) < least:
                raise ConfigError(f"{name} must be at least {least}, got {getattr(self, name)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")

    def resolved(self) -> BenchSettings:
        """These settings with the thread count fixed."""
        threads = self.threads if self.threads is not None else torch.get_num_threads()
        return BenchSettings(**{**asdict(self), "threads": threads})

    def to_dict(self) -> dict:
        return {**asdict(self), "batch_sizes": list(self.batch_sizes)}


@dataclass
class Speed:
    batch: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    ttft_seconds: float


@dataclass
class BenchRow:
    model: str
    baseline: bool
    load_seconds: float
    rss_mb: float
    weight_mb: float
    peak_rss_mb: float
    speeds: list[Speed]
    kernels: dict[str, int] = field(default_factory=dict)
    """Quantized layers per kernel; empty for a float model."""
    ratios: dict[str, float] = field(default_factory=dict)
    """Model / baseline of each figure (``ratios``)."""

    def to_dict(self) -> dict:
        return asdict(self)


def ratios(row: BenchRow, base: BenchRow) -> dict[str, float]:
    """``row`` / ``base`` for every figure; per batch size b: ``prefill_b{b}``, ``decode_b{b}``,
    ``ttft_b{b}``. NaN where the baseline's figure is not positive."""

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else math.nan

    out = {name: ratio(getattr(row, name), getattr(base, name))
           for name in ("load_seconds", "rss_mb", "weight_mb", "peak_rss_mb")}
    base_speeds = {s.batch: s for s in base.speeds}
    for s in row.speeds:
        b = base_speeds[s.batch]
        out[f"prefill_b{s.batch}"] = ratio(s.prefill_tokens_per_s, b.prefill_tokens_per_s)
        out[f"decode_b{s.batch}"] = ratio(s.decode_tokens_per_s, b.decode_tokens_per_s)
        out[f"ttft_b{s.batch}"] = ratio(s.ttft_seconds, b.ttft_seconds)
    return out


# -- measurements ---------------------------------------------------------------------------------


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer ``model`` holds, tensors sharing storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def median_seconds(fn, repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompt_tokens(tokenizer, settings: BenchSettings) -> torch.Tensor:
    """``(max batch, prompt_tokens)``: consecutive windows of the evaluation text."""
    from lowbit.data.calibration import evaluation_tokens

    rows, length = max(settings.batch_sizes), settings.prompt_tokens
    stream = evaluation_tokens(tokenizer, source=settings.source, max_tokens=rows * length)
    if stream.shape[1] < rows * length:
        raise ConfigError(f"the {settings.source!r} evaluation text has {stream.shape[1]} tokens; "
                          f"batch {rows} x {length} prompt tokens needs {rows * length}")
    return stream.view(rows, length)


def measure_speed(model, tokens: torch.Tensor, settings: BenchSettings) -> list[Speed]:
    """Prefill and decode tokens/s and time to first token at each batch size, on the first
    ``batch`` rows of ``tokens`` (see the module's docstring)."""
    import inspect

    from lowbit.eval.chat import greedy_generate

    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    n = settings.decode_tokens
    speeds = []
    for batch in settings.batch_sizes:
        ids = tokens[:batch]
        mask = torch.ones_like(ids)

        def prefill(ids=ids, mask=mask):
            extra = {"logits_to_keep": 1} if keep_last else {}
            model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)

        # min_new_tokens: the end-of-sequence token cannot end a generation early
        def first(ids=ids):
            greedy_generate(model, ids, 1, min_new_tokens=1)

        def generate(ids=ids):
            greedy_generate(model, ids, n, min_new_tokens=n)

        with torch.inference_mode():
            t_prefill = median_seconds(prefill, settings.repeats)
            t_first = median_seconds(first, settings.repeats)
            t_gen = median_seconds(generate, settings.repeats)
        decode = batch * (n - 1) / (t_gen - t_first) if t_gen > t_first else math.nan
        speeds.append(Speed(batch, batch * ids.shape[1] / t_prefill, decode, t_first))
    return speeds


def import_model_code(spec: str) -> None:
    """Import the code that loading ``spec`` needs: lowbit's readers and the transformers module
    of its architecture (for Llama about 160 MB resident with what it pulls in), so that the
    memory measured for loading is the model's own. A bundled name or a .gguf file is resolved
    to its cached converted folder here (converted once, the first time)."""
    import lowbit.export  # noqa: F401
    import lowbit.io  # noqa: F401
    from lowbit.errors import LowbitError
    from lowbit.models.load import resolve_model

    config = Path(spec) / "config.json"
    try:
        if not config.is_file():
            config = Path(resolve_model(spec).folder) / "config.json"
        model_type = json.loads(config.read_text()).get("model_type")
    except (LowbitError, OSError, ValueError) as e:  # the loader will say what is wrong
        log.debug("no architecture found for %s: %s", spec, e)
        return
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[model_type]]  # the lookup imports the module
    except (KeyError, ValueError):
        log.debug("transformers has no causal LM class for model type %r", model_type)


def measure(spec: str, loader, settings: BenchSettings, baseline: bool = False) -> BenchRow:
    """Load ``spec`` with ``loader(spec) -> (model, tokenizer)`` and measure it in this process
    (meant for a fresh one: the memory figures are this process's)."""
    from lowbit.memory import peak_rss_mb
    from lowbit.nn.linear import QuantizedLinear, set_kernel

    torch.set_num_threads(settings.threads or torch.get_num_threads())
    import_model_code(spec)
    gc.collect()
    before = resident_mb()
    start = time.perf_counter()
    model, tokenizer = loader(spec)
    if settings.kernel is not None:
        set_kernel(model, settings.kernel, fallback="dequant")
    load_seconds = time.perf_counter() - start
    gc.collect()
    rss = resident_mb() - before
    kernels: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            kernels[module.kernel] = kernels.get(module.kernel, 0) + 1
    speeds = measure_speed(model, prompt_tokens(tokenizer, settings), settings)
    return BenchRow(spec, baseline, load_seconds, rss, weight_bytes(model) / 1e6, peak_rss_mb(), speeds, kernels)


def bench_models(specs: list[str], baseline: str, loader, settings: BenchSettings | None = None, *,
                 isolate: bool = True, progress: bool = True) -> tuple[list[BenchRow], BenchSettings]:
    """The baseline's row, then each model's, with ratios to the baseline; and the settings used.

    loader: ``loader(spec) -> (model, tokenizer)``, a module-level function (it travels to each
    measuring process). isolate=False measures in this process (for tests: memory figures then
    mix). The baseline is measured once even when it is also in ``specs``."""
    from tqdm.auto import tqdm

    settings = (settings or BenchSettings()).resolved()
    order = [baseline] + [s for s in specs if s != baseline]
    rows = []
    for spec in tqdm(order, desc="bench", unit="model", disable=not progress):
        log.info("measuring %s (%d threads)", spec, settings.threads)
        if isolate:
            row = run_in_process(measure, spec, loader, settings, spec == baseline, label=spec)
        else:
            row = measure(spec, loader, settings, spec == baseline)
        rows.append(row)
    for row in rows:
        row.ratios = ratios(row, rows[0])
    return rows, settings


def recorded_baseline(spec: str) -> str | None:
    """The source model a lowbit folder's report records (``model_spec``), or None."""
    report = Path(spec) / REPORT_FILE
    try:
        made = json.loads(report.read_text())
    except (OSError, ValueError):
        return None
    source = (made.get("model_spec") or made.get("model")) if isinstance(made, dict) else None
    return source if isinstance(source, str) and source else None


def settings_record(settings: BenchSettings) -> dict:
    """The settings of a run for its JSON: the ``BenchSettings`` and the machine's facts."""
    import os
    import platform

    return {**settings.to_dict(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "device": "cpu"}
