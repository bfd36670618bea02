"""Reading runs: what each input of ``lowbit report`` says about which model.

An input is one of

    a ``lowbit compare --keep DIR`` folder   DIR/compare.json + DIR/<scheme>-<method>/ (lowbit folders)
    a quantized lowbit folder                its lowbit_report.json (per-layer errors) and config
    a JSON file with a ``"kind"``            tasks, validate, bench, chat, compare, eval, harness
                                             (``lowbit eval --json`` before it had a kind: any
                                             object with ``rows`` of perplexity and KL)

Everything said about one model is joined into one ``Run``, keyed by the model's path (resolved
when it exists) or spec; a spec that names no existing path is matched by its last path part.
Readers of other commands' JSON are lenient: a missing field leaves its cell empty, and a file
that is not one of these kinds is refused with a one-line error.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.errors import ConfigError, LowbitError

log = logging.getLogger(__name__)

REPORT_FILE = "lowbit_report.json"
COMPARE_FILE = "compare.json"
KINDS = ("compare", "eval", "tasks", "validate", "bench", "chat", "harness")

_LAYER_NAME = re.compile(r"(?:^|\.)(\d+)\.(.+)$")


@dataclass
class LayerError:
    """One quantized linear's error, as its run's report states it."""

    name: str
    """Full module name, e.g. ``model.layers.3.mlp.down_proj``."""
    layer: int | None
    """Decoder layer index (the first number in the name); None outside the decoder layers."""
    kind: str
    """The linear's own name, e.g. ``down_proj``."""
    value: float | None


@dataclass
class Fidelity:
    """Agreement with the float model on the same evaluation tokens (``lowbit eval`` / compare)."""

    perplexity: float | None = None
    ppl_change_pct: float | None = None
    mean_kl: float | None = None
    p99_kl: float | None = None
    top1_agreement: float | None = None


@dataclass
class TaskScore:
    task: str
    accuracy: float
    stderr: float | None = None
    n: int | None = None
    shots: int | None = None
    metric: str | None = None


@dataclass
class Verdict:
    """A ``lowbit validate`` outcome: "pass", "noise" or "fail", with the failing tasks."""

    verdict: str
    budget: float | None = None
    tasks: list[dict] = field(default_factory=list)
    """The per-task comparisons as the validate JSON gave them."""


@dataclass
class Run:
    """Everything the inputs say about one model."""

    key: str
    label: str
    baseline: bool = False
    """The float model the others are measured against."""
    method: str | None = None
    scheme: str | None = None
    size_mb: float | None = None
    """Bytes of all stored tensors (quantized layers, embeddings, norms), in MB."""
    bits_per_weight: float | None = None
    """Over the quantized linear layers, scales and zero points included."""
    folder: Path | None = None
    """The lowbit folder, when the run has one (per-layer errors and weights come from it)."""
    error_metric: str | None = None
    """What ``layers[].value`` is: ``output_error`` (relative output error on calibration
    inputs) or, without calibration, the quantizer's own objective (e.g. ``weight_mse``)."""
    layers: list[LayerError] = field(default_factory=list)
    transforms: list[str] = field(default_factory=list)
    """Stages that changed the weights before quantizing (AWQ scales, ...)."""
    fidelity: Fidelity | None = None
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    bench: dict[str, float] = field(default_factory=dict)
    """Speed and memory figures, each as given (ratios end in ``_ratio``)."""
    verdict: Verdict | None = None


@dataclass
class ChatItem:
    id: str | None
    prompt: str
    answers: dict[str, str]
    """Column title -> answer text (e.g. baseline, quantized)."""
    checks: dict[str, object]
    """Agreement measures and flags as given (exact match of the first tokens, code passes, ...)."""


@dataclass
class ChatSet:
    title: str
    items: list[ChatItem]


@dataclass
class Collection:
    """The runs (float baseline first) and the side material of a report."""

    runs: list[Run] = field(default_factory=list)
    chats: list[ChatSet] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    """What was read, for the page's footer."""
    eval_settings: dict = field(default_factory=dict)
    """Evaluation text, tokens scored and window of the fidelity numbers."""

    def run(self, spec: str, *, baseline: bool = False) -> Run:
        """The run of model ``spec``, created when no input named it yet."""
        key = model_key(spec)
        found = next((r for r in self.runs if r.key == key), None)
        if found is None:
            tail = Path(str(spec)).name
            found = next((r for r in self.runs if Path(r.key).name == tail), None)
        if found is None:
            found = Run(key=key, label=label_for(spec))
            self.runs.append(found)
        found.baseline = found.baseline or baseline
        return found

    def ordered(self) -> list[Run]:
        return [r for r in self.runs if r.baseline] + [r for r in self.runs if not r.baseline]

    def quantized(self) -> list[Run]:
        return [r for r in self.runs if not r.baseline]


def model_key(spec: str) -> str:
    path = Path(str(spec)).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


def label_for(spec: str) -> str:
    path = Path(str(spec))
    return path.name if path.exists() and path.name else str(spec)


def collect(inputs: list[str | Path]) -> Collection:
    """Read every input (in order) into one Collection."""
    if not inputs:
        raise ConfigError("report needs at least one run: a compare folder, a lowbit folder or a JSON file")
    out = Collection()
    for item in inputs:
        add_input(out, Path(item))
    return out


def add_input(out: Collection, path: Path) -> None:
    if path.is_dir():
        if (path / COMPARE_FILE).is_file():
            add_compare(out, _read_json(path / COMPARE_FILE), path)
        elif (path / REPORT_FILE).is_file():
            add_folder(out, path)
        else:
            raise ConfigError(f"{path} holds neither {COMPARE_FILE} (a `lowbit compare --keep` folder) nor "
                              f"{REPORT_FILE} (a quantized lowbit folder); give one of those or a --json output")
        out.sources.append(str(path))
        return
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give a compare folder, a lowbit folder or a JSON file")
    data = _read_json(path)
    kind = data.get("kind") or _kind_of_old_output(data)
    readers = {"compare": lambda: add_compare(out, data, path.parent), "eval": lambda: add_eval(out, data),
               "tasks": lambda: add_tasks(out, data), "validate": lambda: add_validate(out, data),
               "bench": lambda: add_bench(out, data), "chat": lambda: add_chat(out, data, path),
               "harness": lambda: add_harness(out, data)}
    if kind not in readers:
        raise ConfigError(f"{path}: unknown kind {kind!r}; report reads the --json output of "
                          f"{', '.join(KINDS)} (saved with `--json > file.json`)")
    readers[kind]()
    out.sources.append(str(path))


def _kind_of_old_output(data: dict) -> str | None:
    """Outputs written before they had a kind: compare rows name a scheme and a method, eval
    rows a model."""
    rows = _rows(data, "rows")
    if rows and all("scheme" in r and "method" in r for r in rows):
        return "compare"
    return "eval" if rows else None


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"cannot read {file} as JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} holds a JSON {type(data).__name__}, not the object a --json output prints")
    return data


# -- quantized folders ------------------------------------------------------------------------


def add_folder(out: Collection, folder: Path, spec: str | None = None) -> Run:
    """A quantized lowbit folder: method, scheme, size, bits per weight and per-layer errors."""
    from lowbit.contents import inspect_folder

    report = _read_json(folder / REPORT_FILE)
    run = out.run(spec or str(folder))
    run.folder = folder
    recipe = report.get("recipe") or {}
    run.method = run.method or recipe.get("method")
    schemes = [layer.get("scheme") for layer in report.get("layers", []) if layer.get("scheme")]
    if schemes and run.scheme is None:
        common = sorted(set(schemes), key=schemes.count, reverse=True)
        run.scheme = common[0] if len(common) == 1 else "mixed: " + ", ".join(common[:3])
    run.transforms = [s.get("name") for s in recipe.get("stages") or [] if s.get("kind") == "transform"]
    try:
        info = inspect_folder(folder)
        run.size_mb = info.file_bytes / 1e6
        run.bits_per_weight = info.bits_per_weight
    except (LowbitError, OSError) as err:  # the table can do without the size
        log.warning("%s: cannot read its sizes (%s)", folder, err)
        run.bits_per_weight = _number(report.get("bits_per_weight"))
    run.error_metric, run.layers = layer_errors(report)
    return run


def layer_errors(report: dict) -> tuple[str | None, list[LayerError]]:
    """Per-linear errors of a saved quantization report: the relative output error when the
    report has one, else each layer's quantizer objective (all layers of one run share it)."""
    layers = [layer for layer in report.get("layers", []) if isinstance(layer, dict) and layer.get("name")]
    if any(_number(layer.get("output_error")) is not None for layer in layers):
        metric, key = "output_error", "output_error"
    else:
        objectives = {layer.get("objective") for layer in layers if layer.get("objective")}
        if len(objectives) != 1:
            return None, []
        metric, key = objectives.pop(), "objective_value"
    out = []
    for layer in layers:
        name = layer["name"]
        match = _LAYER_NAME.search(name)
        index = int(match.group(1)) if match else None
        kind = name.rsplit(".", 1)[-1]
        out.append(LayerError(name, index, kind, _number(layer.get(key))))
    return metric, out


# -- JSON outputs -------------------------------------------------------------------------------


def add_compare(out: Collection, data: dict, folder: Path) -> None:
    """``lowbit compare --json``: one run per row (its kept folder read when present), the
    float model as baseline with its perplexity. Its fidelity numbers replace those of a
    validate file (scored on other tokens), so that every row shares one evaluation."""
    model = data.get("model")
    if model:
        base = out.run(model, baseline=True)
        base.fidelity = Fidelity(perplexity=_number(data.get("baseline_perplexity")), ppl_change_pct=0.0,
                                 mean_kl=0.0, p99_kl=0.0, top1_agreement=1.0)
    _eval_settings(out, data)
    outputs = Path(data["outputs"]) if data.get("outputs") else None
    for row in _rows(data, "rows"):
        name = f"{row.get('scheme')}-{row.get('method')}"
        kept = next((d / name for d in (folder, outputs) if d is not None and (d / name / REPORT_FILE).is_file()),
                    None)
        run = add_folder(out, kept) if kept is not None else out.run(name)
        run.method = row.get("method") or run.method
        run.scheme = row.get("scheme") or run.scheme
        run.bits_per_weight = run.bits_per_weight or _number(row.get("bits_per_weight"))
        run.fidelity = _fidelity(row)


def add_eval(out: Collection, data: dict) -> None:
    """``lowbit eval --json``: the first row is the baseline (no bits per weight)."""
    _eval_settings(out, data)
    for i, row in enumerate(_rows(data, "rows")):
        if not row.get("model"):
            continue
        baseline = i == 0 and row.get("bits_per_weight") is None
        run = out.run(str(row["model"]), baseline=baseline)
        run.size_mb = run.size_mb or _number(row.get("size_mb"))
        run.bits_per_weight = run.bits_per_weight or _number(row.get("bits_per_weight"))
        run.fidelity = _fidelity(row)


def add_tasks(out: Collection, data: dict) -> None:
    """``lowbit eval --tasks --json``: ``{"model": spec, "results": [TaskResult.to_dict()]}``;
    several models add ``runs`` (one ``{"model", "results"}`` each), and with --baseline the
    fidelity table rides along as ``fidelity`` (an eval object, whose first row is the baseline)."""
    if isinstance(data.get("fidelity"), dict):
        add_eval(out, data["fidelity"])
    for entry in _rows(data, "runs") or [data]:
        run = out.run(str(entry.get("model") or "model"))
        for result in _rows(entry, "results"):
            score = _task_score(result)
            if score is not None:
                run.tasks[score.task] = score


def add_harness(out: Collection, data: dict) -> None:
    """``lowbit harness --json`` (lm-eval's task definitions): per task its ``acc_norm``, else
    ``acc``, as the column ``<task> (lm-eval)`` (its prompts and scoring are lm-eval's, not
    lowbit's, so the two are not put in one column)."""
    run = out.run(str(data.get("model") or "model"))
    for result in _rows(data, "results"):
        metrics, stderr = result.get("metrics") or {}, result.get("stderr") or {}
        metric = next((m for m in ("acc_norm", "acc") if _number(metrics.get(m)) is not None), None)
        if not result.get("task") or metric is None or result.get("is_group"):
            continue
        name = f"{result['task']} (lm-eval)"
        run.tasks[name] = TaskScore(name, _number(metrics[metric]), _number(stderr.get(metric)),
                                    _int(result.get("n")), _int(result.get("num_fewshot")), metric)


def add_validate(out: Collection, data: dict) -> None:
    """``lowbit validate --json``: per task the baseline and quantized accuracies and a verdict
    (pass / noise / fail); the overall verdict is the worst task's (``passed`` when no task has
    one); ``fidelity`` (perplexity, KL) fills the fidelity columns."""
    quantized = data.get("model") or data.get("quantized")
    baseline = data.get("baseline")
    rows = _rows(data, "tasks") or _rows(data, "results") or _rows(data, "comparisons") or _rows(data, "rows")
    run = out.run(str(quantized or "quantized"))
    base = out.run(str(baseline), baseline=True) if baseline else None
    for row in rows:
        task = row.get("task")
        if not task:
            continue
        accuracy = _number(row.get("accuracy"))
        if accuracy is not None:
            run.tasks[task] = TaskScore(task, accuracy, _number(row.get("stderr")), _int(row.get("n")),
                                        metric=row.get("metric"))
        base_accuracy = _number(row.get("baseline_accuracy"))
        if base is not None and base_accuracy is not None:
            base.tasks[task] = TaskScore(task, base_accuracy, _number(row.get("baseline_stderr")),
                                         _int(row.get("n")), metric=row.get("metric"))
    verdicts = [str(r.get("verdict")) for r in rows if r.get("verdict")]
    stated = data.get("verdict")
    if stated is None and verdicts:
        stated = next((v for v in ("fail", "noise") if v in verdicts), "pass")
    if stated is None and isinstance(data.get("passed"), bool):
        stated = "pass" if data["passed"] else "fail"
    if stated is not None:
        budget = data.get("budget")
        run.verdict = Verdict(str(stated), _number(budget) if not isinstance(budget, str) else _budget(budget),
                              rows)
    fidelity = data.get("fidelity")
    if isinstance(fidelity, dict):
        run.fidelity = run.fidelity or _fidelity(fidelity)
        reference = _number(fidelity.get("baseline_perplexity"))
        if base is not None and base.fidelity is None and reference is not None:
            base.fidelity = Fidelity(perplexity=reference, ppl_change_pct=0.0, mean_kl=0.0, top1_agreement=1.0)


def add_bench(out: Collection, data: dict) -> None:
    """``lowbit bench --json``: per model its numeric figures (load time, memory, tokens/s,
    time to first token, and ratios to the baseline measured in the same run)."""
    rows = _rows(data, "rows") or _rows(data, "results") or _rows(data, "models")
    if not rows and data.get("model"):
        rows = [data]
    baseline = data.get("baseline")
    for row in rows:
        spec = row.get("model") or row.get("name")
        if not spec:
            continue
        is_base = bool(row.get("baseline")) if isinstance(row.get("baseline"), bool) else spec == baseline
        run = out.run(str(spec), baseline=is_base)
        run.bench.update(_flat_numbers(row))


def add_chat(out: Collection, data: dict, file: Path) -> None:
    """``lowbit chat --json``: per prompt the answers (every text field but the prompt) side by
    side, and the agreement measures (numbers and flags)."""
    rows = (_rows(data, "results") or _rows(data, "prompts") or _rows(data, "items") or _rows(data, "rows")
            or _rows(data, "answers"))
    items = []
    for row in rows:
        prompt_key = next((k for k in ("prompt", "question", "instruction", "messages") if k in row), None)
        prompt = row.get(prompt_key) if prompt_key else row.get("id") or row.get("name") or ""
        if isinstance(prompt, list):  # chat messages
            prompt = "\n".join(str(m.get("content", m)) if isinstance(m, dict) else str(m) for m in prompt)
        answers = {key.replace("_", " "): value for key, value in row.items()
                   if isinstance(value, str) and key not in (prompt_key, "id", "name", "kind")}
        checks = {}
        for key, value in row.items():
            if key in (prompt_key, "id", "name", "kind") or isinstance(value, str):
                continue
            if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
                # one set of checks per answer: {"baseline": {"runs": true}, "model": {"runs": false}}
                for check in dict.fromkeys(c for v in value.values() for c in v):
                    title = f"{check.replace('_', ' ')} ({' / '.join(value)})"
                    checks[title] = " / ".join(check_text(v.get(check)) for v in value.values())
            elif isinstance(value, dict):
                checks.update(_flat_scalars(value, f"{key} "))
            elif isinstance(value, bool | int | float) or value is None:
                checks[key.replace("_", " ")] = value
        name = row.get("id") or row.get("name")
        items.append(ChatItem(str(name) if name and prompt_key else None, str(prompt), answers, checks))
    if items:
        models = [label_for(str(data[k])) for k in ("baseline", "model") if data.get(k)]
        out.chats.append(ChatSet(" vs ".join(models) or file.name, items))


# -- helpers -----------------------------------------------------------------------------------


def _rows(data: dict, key: str) -> list[dict]:
    rows = data.get(key)
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _int(value) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _budget(text: str) -> float | None:
    raw = text.strip()
    try:
        return float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        return None


def _fidelity(row: dict) -> Fidelity:
    return Fidelity(
        perplexity=_number(row.get("perplexity")),
        ppl_change_pct=_number(row.get("ppl_change_pct", row.get("perplexity_change_pct"))),
        mean_kl=_number(row.get("mean_kl")), p99_kl=_number(row.get("p99_kl")),
        top1_agreement=_number(row.get("top1_agreement")),
    )


def _task_score(result: dict) -> TaskScore | None:
    task, accuracy = result.get("task"), _number(result.get("accuracy"))
    if not task or accuracy is None:
        return None
    return TaskScore(str(task), accuracy, _number(result.get("stderr")), _int(result.get("n")),
                     _int(result.get("shots")), result.get("metric"))


def _flat_numbers(row: dict, prefix: str = "") -> dict[str, float]:
    """Numeric fields of a row, nested objects flattened with their key as a prefix
    (``{"ratios": {"decode": 0.8}}`` -> ``decode_ratio`` when the object is named ratios)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            if key in ("ratio", "ratios", "vs_baseline"):
                out.update({f"{prefix}{k}_ratio": v for k, v in _flat_numbers(value).items()})
            else:
                out.update(_flat_numbers(value, f"{prefix}{key}_"))
        elif (number := _number(value)) is not None:
            out[f"{prefix}{key}"] = number
    return out


def check_text(value) -> str:
    """A check's value as a word or a short number."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _flat_scalars(row: dict, prefix: str = "") -> dict[str, object]:
    """Non-text scalar fields of a row, nested objects flattened (``{"a": {"b": 1}}`` -> ``a b``)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(_flat_scalars(value, f"{prefix}{key} "))
        elif isinstance(value, bool | int | float) or value is None:
            out[f"{prefix}{key}".replace("_", " ")] = value
    return out


def _eval_settings(out: Collection, data: dict) -> None:
    for key in ("source", "tokens_scored", "window", "stride"):
        if data.get(key) is not None:
            out.eval_settings.setdefault(key, data[key])
