"""lm-evaluation-harness on lowbit models: lm-eval's task definitions, lowbit's model objects.

lm-eval's ``HFLM`` accepts a loaded ``transformers.PreTrainedModel``. A lowbit model is one,
float or quantized (``lowbit.io.load`` builds the architecture's own class and puts
``QuantizedLinear`` modules in place of its linears), so the adapter is thin. What it settles:

- BOS: HFLM gets ``add_bos_token=loglik.add_bos(tokenizer, model)``, the choice lowbit's own
  scorer makes, so both score the same token sequences (Gemma prepends BOS, Llama/SmolLM2 not).
- backend ``causal``; the device and dtype are the model's own (HFLM moves nothing it was handed).
- HFLM calls ``model.eval()`` and ``model.tie_weights()`` on the object. Neither changes a
  lowbit model: a quantized ``lm_head`` has no ``weight`` parameter to re-tie (tested).
- HFLM gives the tokenizer a pad token when it has none (the unk or eos token); padding never
  reaches a scored position.
- the model's progress bars follow ``progress`` (a subclass passing lm-eval's ``disable_tqdm``).

How lm-eval scores a ``multiple_choice`` document with choices c_1..c_k and gold g: one request
(context, target_delimiter + c_i) per choice; ll_i = sum of log p(continuation tokens | context),
the continuation tokens being encode(context + continuation)[len(encode(context)):] after
trailing spaces of the context move to the continuation; ``acc`` = [argmax_i ll_i == g],
``acc_norm`` = [argmax_i ll_i / len(c_i) == g] (length in characters); each metric's stderr is
the sample standard error of the mean, sqrt(p (1 - p) / (n - 1)) for an accuracy p over n.

Offline, :func:`write_local_task` turns lowbit's task items into an lm-eval task file
(``dataset_path: json`` over a JSONL file beside it): ``target_delimiter`` is empty and the
choices are lowbit's continuations as stored (leading space included), so lm-eval's requests
are exactly lowbit's (context, continuation) pairs. lm-eval is an optional dependency
(``pip install lowbit[harness]``); it is imported when a function here runs.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lowbit import defaults
from lowbit.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HarnessItem:
    """One scored document: its requests and lm-eval's (log-likelihood, is_greedy) for each."""

    doc_id: int
    """The document's index in the task's evaluation split."""
    item_id: str
    """The document's ``id`` field where it has one (lowbit's item id), else ``doc_id``."""
    requests: tuple[tuple[str, str], ...]
    loglikelihoods: tuple[float, ...]
    is_greedy: tuple[bool, ...]
    metrics: dict[str, float]
    """This document's value of each metric, e.g. {"acc": 1.0, "acc_norm": 0.0}."""


@dataclass
class HarnessResult:
    """One lm-eval task (or group) of a run."""

    task: str
    num_fewshot: int | None
    """None for a group (its tasks may differ)."""
    n: int | None
    """Documents scored (after ``limit``); None for a group."""
    metrics: dict[str, float]
    """Metric name -> value; a filter other than lm-eval's ``none`` is kept in the name
    (``exact_match,strict-match``)."""
    stderr: dict[str, float | None]
    """Metric name -> standard error; None where lm-eval gives none."""
    is_group: bool = False
    items: list[HarnessItem] = field(default_factory=list)
    """Per document, only when the run was asked to keep them."""

    def to_dict(self) -> dict:
        out = {"task": self.task, "num_fewshot": self.num_fewshot, "n": self.n, "is_group": self.is_group,
               "metrics": dict(self.metrics), "stderr": dict(self.stderr)}
        if self.items:
            out["items"] = [
                {"doc_id": it.doc_id, "item_id": it.item_id, "requests": [list(r) for r in it.requests],
                 "loglikelihoods": list(it.loglikelihoods), "is_greedy": list(it.is_greedy),
                 "metrics": dict(it.metrics)}
                for it in self.items
            ]
        return out


def harness_model(model, tokenizer, *, batch_size: int = 8, max_length: int | None = None,
                  progress: bool = True):
    """An lm-eval ``LM`` (an ``HFLM``) scoring with ``model`` and ``tokenizer`` as they are.

    ``model`` is a causal ``PreTrainedModel`` (float, or quantized by lowbit); ``max_length``
    (tokens; longer requests keep their last tokens) defaults to lowbit's scorer's,
    ``loglik.max_length(model)``."""
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lowbit.eval import loglik

    if not isinstance(model, PreTrainedModel):
        raise ConfigError(f"lm-eval's HFLM needs a transformers PreTrainedModel, got {type(model).__name__}; "
                          "load the model with lowbit (lowbit.io.load or lowbit.models.load.load_model)")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ConfigError(f"lm-eval's HFLM needs a transformers tokenizer, got {type(tokenizer).__name__}; "
                          "load it with AutoTokenizer.from_pretrained(folder)")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    cls = _lm_class()
    return cls(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
               max_length=max_length or loglik.max_length(model), add_bos_token=loglik.add_bos(tokenizer, model),
               progress=progress)


def _lm_class():
    """HFLM with its progress bars under the caller's control (lm-eval passes ``disable_tqdm``
    only from its own command line)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ConfigError("lm-eval is not installed; install it with `pip install lowbit[harness]` "
                          "(or `pip install lm-eval`)") from None

    class LowbitHFLM(HFLM):
        def __init__(self, *args, progress: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.progress = progress

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.progress)

    return LowbitHFLM


def run_harness(model, tokenizer, tasks: Sequence[str], *, include_path: str | Path | None = None,
                limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                fewshot_seed: int = defaults.TASK_SEED, keep_items: bool = False,
                progress: bool = True) -> list[HarnessResult]:
    """Run lm-eval ``tasks`` (task or group names, or paths of task YAML files) on the model.

    include_path: a folder (or YAML file) of extra task definitions, e.g. from
    :func:`write_local_task`; a hub-free run needs every task's data there. limit: the first
    ``limit`` documents of each task (lm-eval's rule). num_fewshot: overrides each task's
    default shots, except where a task file fixes 0. keep_items: return every document's
    requests and log-likelihoods (``HarnessResult.items``).

    Raises ConfigError for an unknown task and for a task whose data needs the hub while
    offline. No global random seed is set (lm-eval's would be); the few-shot sampler gets
    ``fewshot_seed``."""
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ConfigError("no lm-eval task given; name one, e.g. --tasks arc_easy")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    lm = harness_model(model, tokenizer, batch_size=batch_size, progress=progress)  # checks lm-eval is there
    manager = task_manager(tasks, include_path)
    import lm_eval

    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            log_samples=keep_items, random_seed=None, numpy_random_seed=None, torch_random_seed=None,
            fewshot_random_seed=fewshot_seed,
        )
    except OSError as err:  # datasets raises ConnectionError offline; other clients an OSError saying so
        if isinstance(err, ConnectionError) or any(w in str(err).lower() for w in ("offline", "reach")):
            raise ConfigError(f"an lm-eval task needs hub data and the hub is not reachable ({_first_line(err)}); "
                              "offline, write a local task file (lowbit.eval.harness.write_local_task, "
                              "docs/harness.md) and pass its folder as include_path") from None
        raise
    return parse_results(out, keep_items=keep_items)


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None):
    """lm-eval's TaskManager: over ``include_path`` alone when it defines every task named (it
    skips indexing lm-eval's thousands of built-in task files), else over both."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        include_path = Path(include_path)
        if not include_path.exists():
            raise ConfigError(f"include path {include_path} does not exist; give a folder of lm-eval task YAML files")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks or t.endswith((".yaml", ".yml")) for t in tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in manager.all_tasks and not t.endswith((".yaml", ".yml"))]
    if unknown:
        where = f" or in {include_path}" if include_path is not None else ""
        raise ConfigError(f"unknown lm-eval task {', '.join(unknown)}: not among lm-eval's tasks{where}; "
                          "list them with `lm-eval ls tasks`, or pass a folder of task YAML files")
    return manager


def parse_results(out: dict, *, keep_items: bool = False) -> list[HarnessResult]:
    """lm-eval's ``simple_evaluate`` output as typed results, tasks in lm-eval's order."""
    groups = set(out.get("groups") or {})
    samples = out.get("samples") or {}
    results = []
    for name, entry in out["results"].items():
        metrics, stderr = {}, {}
        for key, value in entry.items():
            if "," not in key:
                continue  # alias, name, sample_len
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr"):
                base = metric[: -len("_stderr")]
                stderr[base if filt == "none" else f"{base},{filt}"] = _number(value)
            else:
                number = _number(value)
                if number is not None:
                    metrics[metric if filt == "none" else f"{metric},{filt}"] = number
        is_group = name in groups
        n = None if is_group else (out.get("n-samples", {}).get(name) or {}).get("effective")
        shots = None if is_group else out.get("n-shot", {}).get(name)
        items = [_item(s) for s in samples.get(name, [])] if keep_items else []
        results.append(HarnessResult(task=name, num_fewshot=shots, n=n, metrics=metrics,
                                     stderr={k: stderr.get(k) for k in metrics}, is_group=is_group,
                                     items=items))
    return results


def _item(sample: dict) -> HarnessItem:
    """One lm-eval sample record; log-likelihoods where its responses are (ll, is_greedy) pairs."""
    requests = tuple(tuple(str(a) for a in args) for args in sample.get("arguments", ())
                     if isinstance(args, (tuple, list)))
    lls, greedy = [], []
    for resp in sample.get("filtered_resps", ()):
        if isinstance(resp, (tuple, list)) and len(resp) == 2 and isinstance(resp[1], bool):
            lls.append(float(resp[0]))
            greedy.append(bool(resp[1]))
    doc = sample.get("doc")
    doc_id = int(sample["doc_id"])
    item_id = str(doc["id"]) if isinstance(doc, dict) and "id" in doc else str(doc_id)
    metrics = {m: float(sample[m]) for m in sample.get("metrics", ()) if _number(sample.get(m)) is not None}
    return HarnessItem(doc_id=doc_id, item_id=item_id, requests=requests, loglikelihoods=tuple(lls),
                       is_greedy=tuple(greedy), metrics=metrics)


def _number(value) -> float | None:
    """A finite float, or None for lm-eval's "N/A" and non-numbers."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def write_local_task(items: Sequence, folder: str | Path, name: str, *, greedy: bool = False) -> Path:
    """Write lm-eval task ``name`` over lowbit task items into ``folder`` (``name.yaml`` +
    ``name.jsonl``); returns the YAML path. Pass ``folder`` as ``include_path`` and ``name`` as
    the task. The items' shots are already in their contexts, so the task fixes ``num_fewshot: 0``.

    Every request lm-eval builds is one of ``item.requests()``; three shapes, as lowbit scores:

    - options as continuations (MMLU letters, ARC, HellaSwag, PIQA): ``multiple_choice``, metrics
      ``acc`` and ``acc_norm``. When every option starts with a space, the space is the task's
      ``target_delimiter`` and the stored choices go without it, so lm-eval's ``acc_norm``
      divides by the option text's length as lowbit's does; otherwise the delimiter is empty.
    - options in the context (WinoGrande, ``item.option_contexts``): ``multiple_choice`` with one
      context per option (lm-eval's multiple-input form: ``doc_to_text`` is the gold index),
      metric ``acc``.
    - ``greedy`` (LAMBADA): ``loglikelihood`` of the one continuation, metric ``acc`` (greedy
      decoding reproduces it).

    The YAML reads the JSONL with ``dataset_path: json`` (no hub); each row holds the item's
    ``id``, so results map back to lowbit's item ids."""
    import yaml

    if not items:
        raise ConfigError(f"task {name} has no items")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"task name {name!r} must be letters, digits, '_' or '-'")
    for it in items:
        if not 0 <= it.gold < (len(getattr(it, "option_contexts", ())) or len(it.continuations)):
            raise ConfigError(f"item {it.id}: gold {it.gold} is not the index of one of its options")
    partial = any(getattr(it, "option_contexts", ()) for it in items)
    if greedy:
        rows = [{"id": str(it.id), "context": it.context, "continuation": it.continuations[0]} for it in items]
        fields = {"output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "continuation"}
        metrics = ("acc",)
    elif partial:
        rows = [{"id": str(it.id), "contexts": [it.context + c for c in it.option_contexts],
                 "continuation": it.continuations[0], "gold": int(it.gold)} for it in items]
        fields = {"output_type": "multiple_choice", "doc_to_text": "gold", "doc_to_choice": "contexts",
                  "doc_to_target": "continuation", "target_delimiter": ""}
        metrics = ("acc",)
    else:
        spaced = all(c.startswith(" ") for it in items for c in it.continuations)
        rows = [{"id": str(it.id), "context": it.context,
                 "choices": [c[1:] if spaced else c for c in it.continuations], "gold": int(it.gold)}
                for it in items]
        fields = {"output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
                  "doc_to_target": "gold", "target_delimiter": " " if spaced else ""}
        metrics = ("acc", "acc_norm")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        **fields,
        "num_fewshot": 0,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
        "metadata": {"version": 1.0, "written_by": "lowbit.eval.harness.write_local_task"},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


@dataclass
class Agreement:
    """lowbit's scorer and lm-eval on the same items of one lowbit task."""

    task: str
    metric: str
    n: int
    requests: int
    lowbit_accuracy: float
    harness_accuracy: float
    stderr: float
    """Of the accuracy (lowbit's), sqrt(p (1 - p) / (n - 1))."""
    max_loglik_difference: float
    """Largest |lowbit - lm-eval| log-likelihood over all requests, in nats."""
    greedy_mismatches: int
    """Requests whose greedy flags differ."""
    disagreeing_items: list[str]
    """Ids of the items scored right by one and wrong by the other."""

    def to_dict(self) -> dict:
        return {"task": self.task, "metric": self.metric, "n": self.n, "requests": self.requests,
                "lowbit_accuracy": self.lowbit_accuracy, "harness_accuracy": self.harness_accuracy,
                "stderr": self.stderr, "max_loglik_difference": self.max_loglik_difference,
                "greedy_mismatches": self.greedy_mismatches, "disagreeing_items": list(self.disagreeing_items)}


def check_agreement(model, tokenizer, task: str, folder: str | Path, *, shots: int | None = None,
                    limit: int | None = None, seed: int | None = None, data_dir: str | None = None,
                    batch_size: int = 8, progress: bool = True) -> Agreement:
    """Score lowbit task ``task``'s items (``tasks.load_items`` with these settings) with lowbit's
    scorer and, through a local task file written into ``folder``, with lm-eval; compare per
    request and per item. The two use the same requests, so a difference beyond float rounding
    is a bug in one of them (or a convention that drifted apart)."""
    from lowbit.eval import tasks as lowbit_tasks
    from lowbit.eval.loglik import loglikelihoods

    seed = lowbit_tasks.DEFAULT_SEED if seed is None else seed
    spec = lowbit_tasks.TASKS[lowbit_tasks.check_tasks([task])[0]]
    items = lowbit_tasks.load_items(spec.name, shots=shots, limit=limit, seed=seed, data_dir=data_dir)
    requests = [r for it in items for r in it.requests()]
    ours = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    correct = lowbit_tasks.score_items(spec, items, ours)[spec.metric]
    name = f"lowbit_{spec.name}"
    write_local_task(items, folder, name, greedy=spec.greedy)
    (result,) = run_harness(model, tokenizer, [name], include_path=folder, batch_size=batch_size,
                            keep_items=True, progress=progress)
    theirs = [(ll, g) for h in result.items for ll, g in zip(h.loglikelihoods, h.is_greedy)]
    if [r for h in result.items for r in h.requests] != [(c, x) for c, x in requests]:
        raise RuntimeError(f"{name}: lm-eval built other requests than lowbit's items; the task file is wrong")
    n = len(items)
    p = sum(correct) / n
    return Agreement(
        task=spec.name, metric=spec.metric, n=n, requests=len(requests), lowbit_accuracy=p,
        harness_accuracy=result.metrics[spec.metric],
        stderr=math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan"),
        max_loglik_difference=max(abs(a[0] - b[0]) for a, b in zip(ours, theirs)),
        greedy_mismatches=sum(a[1] != b[1] for a, b in zip(ours, theirs)),
        disagreeing_items=[it.id for it, c, h in zip(items, correct, result.items)
                           if bool(c) != bool(h.metrics[spec.metric])],
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
