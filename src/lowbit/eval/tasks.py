"""Task accuracy by log-likelihood, with lm-eval's prompt formats (docs/evaluation.md lists them).

An :class:`Item` is a prompt and its options; each option is one (context, continuation)
request for :func:`lowbit.eval.loglik.loglikelihoods`. Scoring, per item with option scores
``ll_i`` (summed log-probabilities of the continuation) and gold option ``g``:

- ``acc``:      argmax_i ll_i == g                     (MMLU, C-Eval, CMMLU letters; WinoGrande)
- ``acc_norm``: argmax_i ll_i / len(option_i) == g     (HellaSwag, ARC, PIQA; ``len`` counts the
  characters of the option text without the space that joins it to the prompt, as lm-eval does)
- ``acc`` for LAMBADA: greedy decoding reproduces the whole last word.

Ties go to the first option (numpy's argmax). The standard error of an accuracy p over n items
is the sample standard error of the mean of the 0/1 outcomes, sqrt(p (1 - p) / (n - 1)), as
lm-eval reports it.

k-shot prompts follow lm-eval: ``description + shot_1 + "\\n\\n" + ... + shot_k + "\\n\\n" + query``,
each shot being its query, the target delimiter " " and its gold option. MMLU, C-Eval and CMMLU
take the first k items of the subject's dev split; the other tasks draw k items with a generator
seeded by (seed, task, item id) from a split other than the scored one where one exists here
(ARC: validation, scoring test), else from the scored split's other items (never the item itself).

``limit`` keeps the n items whose hash of (seed, task, item id) is smallest: a seeded shuffle that
is the same on every model and every run, and nested (the first 200 are among the first 500).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lowbit import defaults
from lowbit.errors import ConfigError
from lowbit.eval import task_data
from lowbit.eval.loglik import loglikelihoods

log = logging.getLogger(__name__)

PROMPT_VERSION = 1
"""Bumped whenever a prompt format changes, so that cached results are not reused across it."""

DEFAULT_SEED = defaults.TASK_SEED


@dataclass(frozen=True)
class Item:
    """One scored question: option i is the request ``(context, continuations[i])``.

    Partial evaluation (WinoGrande) puts the options into the context instead: then
    ``option_contexts[i]`` is option i's context and ``continuations`` holds the one shared
    continuation that is scored."""

    id: str
    context: str
    continuations: tuple[str, ...]
    gold: int
    option_contexts: tuple[str, ...] = ()

    @property
    def num_options(self) -> int:
        return len(self.option_contexts) or len(self.continuations)

    def requests(self) -> list[tuple[str, str]]:
        if self.option_contexts:
            return [(self.context + c, self.continuations[0]) for c in self.option_contexts]
        return [(self.context, c) for c in self.continuations]

    def option_lengths(self) -> list[int]:
        """Characters of each option's text (acc_norm's divisor), without the joining space."""
        texts = self.option_contexts or self.continuations
        return [max(1, len(t[1:] if t.startswith(" ") else t)) for t in texts]


@dataclass(frozen=True)
class TaskSpec:
    """A task: where its items come from and how they are scored."""

    name: str
    title: str
    scored_split: str
    shot_source: str
    metric: str
    """The primary metric: acc or acc_norm (both are computed for option-continuation tasks)."""
    build: Callable[..., list[Item]] = field(repr=False)
    """(shots, seed, data_dir) -> every item of the scored split, in file order."""
    greedy: bool = False
    """Scored by greedy reproduction of the one continuation (LAMBADA), not by choosing."""


@dataclass
class TaskResult:
    task: str
    shots: int
    n: int
    metric: str
    accuracy: float
    stderr: float
    item_ids: list[str]
    correct: list[bool]
    settings: dict
    metrics: dict[str, float] = field(default_factory=dict)
    """Every metric computed (acc, and acc_norm where it applies) with ``<name>_stderr``."""

    def to_dict(self) -> dict:
        def clean(x):
            return None if isinstance(x, float) and not math.isfinite(x) else x

        return {
            "task": self.task, "shots": self.shots, "n": self.n, "metric": self.metric,
            "accuracy": clean(self.accuracy), "stderr": clean(self.stderr),
            "metrics": {k: clean(v) for k, v in self.metrics.items()},
            "settings": dict(self.settings), "item_ids": list(self.item_ids), "correct": list(self.correct),
        }


def stderr_of_mean(p: float, n: int) -> float:
    """sqrt(p (1 - p) / (n - 1)): the sample standard error of a mean of n 0/1 outcomes; NaN for n < 2."""
    if n < 2:
        return float("nan")
    return math.sqrt(p * (1.0 - p) / (n - 1))


# --- prompt formats (lm-eval's standard task YAMLs) ----------------------------------------------

def _lettered_query(q: task_data.Question, answer_cue: str) -> str:
    lines = [q.question.strip()] + [f"{letter}. {text}" for letter, text in zip(task_data.LETTERS, q.options)]
    return "\n".join(lines) + "\n" + answer_cue


def _subject_words(subject: str) -> str:
    return subject.replace("_", " ")


_LETTER_OPTIONS = tuple(f" {letter}" for letter in task_data.LETTERS)


def _lettered_items(name: str, docs: Sequence[task_data.Question], dev: Sequence[task_data.Question],
                    shots: int, description: str, answer_cue: str) -> list[Item]:
    """Letter-scored items of one subject: the first ``shots`` dev questions are the examples."""
    if shots > len(dev):
        raise ConfigError(f"{name}: --shots {shots} asks for more examples than the {len(dev)} of the dev split")
    prefix = description + "".join(
        f"{_lettered_query(d, answer_cue)} {task_data.LETTERS[d.answer]}\n\n" for d in dev[:shots])
    return [Item(q.id, prefix + _lettered_query(q, answer_cue), _LETTER_OPTIONS, q.answer) for q in docs]


def _mmlu(shots: int, seed: int, data_dir) -> list[Item]:
    items = []
    for subject in task_data.mmlu_subjects(data_dir):
        description = f"The following are multiple choice questions (with answers) about {_subject_words(subject)}.\n\n"
        items += _lettered_items("mmlu", task_data.mmlu("test", subject, data_dir),
                                 task_data.mmlu("dev", subject, data_dir), shots, description, "Answer:")
    return items


def _chinese(name: str, scored: str, header: str) -> Callable[..., list[Item]]:
    """C-Eval / CMMLU: ``header`` names the subject in Chinese (``{topic}``)."""
    read = getattr(task_data, name)

    def build(shots: int, seed: int, data_dir) -> list[Item]:
        names = task_data.chinese_subject_names(name, data_dir)
        items = []
        for subject in task_data.chinese_subjects(name, data_dir):
            description = header.format(topic=names.get(subject, _subject_words(subject)))
            items += _lettered_items(name, read(scored, subject, data_dir), read("dev", subject, data_dir), shots,
                                     description, "答案：")
        return items

    return build


_ceval = _chinese("ceval", "val", "以下是中国关于{topic}的单项选择题，请选出其中的正确答案。\n\n")
_cmmlu = _chinese("cmmlu", "test", "以下是关于{topic}的单项选择题，请直接给出正确答案的选项。\n\n")


def _draw_shots(task: str, item_id: str, pool: Sequence, shots: int, seed: int) -> list:
    """``shots`` pool entries other than ``item_id``, drawn by a generator seeded per item."""
    if shots == 0:
        return []
    if shots >= len(pool):
        raise ConfigError(f"{task}: --shots {shots} needs more than the {len(pool)} items available as examples")
    rng = random.Random(f"{seed}:{task}:{item_id}")
    picked = [pool[i] for i in rng.sample(range(len(pool)), shots + 1)]
    return [p for p in picked if p.id != item_id][:shots]


def _completion_items(task: str, docs: Sequence[task_data.Completion], pool: Sequence[task_data.Completion],
                      shots: int, seed: int, query: Callable[[task_data.Completion], str],
                      option: Callable[[str], str] = lambda s: s) -> list[Item]:
    items = []
    for d in docs:
        prefix = "".join(f"{query(s)} {option(s.options[s.answer])}\n\n"
                         for s in _draw_shots(task, d.id, pool, shots, seed))
        items.append(Item(d.id, prefix + query(d), tuple(" " + option(o) for o in d.options), d.answer))
    return items


def _question_answer(d: task_data.Completion) -> str:
    return f"Question: {d.text}\nAnswer:"


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow's bracketed markers removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(shots: int, seed: int, data_dir) -> list[Item]:
    docs = task_data.hellaswag(data_dir)
    return _completion_items("hellaswag", docs, docs, shots, seed, lambda d: _hellaswag_clean(d.text),
                             _hellaswag_clean)


def _arc(level: str) -> Callable[..., list[Item]]:
    def build(shots: int, seed: int, data_dir) -> list[Item]:
        pool = task_data.arc(level, "validation", data_dir) if shots else []
        return _completion_items(f"arc_{level.lower()}", task_data.arc(level, "test", data_dir), pool, shots,
                                 seed, _question_answer)
    return build


def _piqa(shots: int, seed: int, data_dir) -> list[Item]:
    docs = task_data.piqa(data_dir)
    return _completion_items("piqa", docs, docs, shots, seed, _question_answer)


def _winogrande(shots: int, seed: int, data_dir) -> list[Item]:
    """Partial evaluation: the option replaces the blank in the context; the rest is scored."""
    docs = task_data.winogrande(data_dir)
    items = []
    for d in docs:
        examples = []
        for s in _draw_shots("winogrande", d.id, docs, shots, seed):
            cut = s.sentence.index("_")
            examples.append(f"{s.sentence[:cut]}{s.options[s.answer]} {s.sentence[cut + 1:].strip()}\n\n")
        cut = d.sentence.index("_")
        items.append(Item(d.id, "".join(examples), (" " + d.sentence[cut + 1:].strip(),), d.answer,
                          option_contexts=tuple(d.sentence[:cut] + o for o in d.options)))
    return items


def _lambada(shots: int, seed: int, data_dir) -> list[Item]:
    docs = task_data.lambada(data_dir)
    items = []
    for d in docs:
        prefix = "".join(f"{s.context}{s.target}\n\n" for s in _draw_shots("lambada", d.id, docs, shots, seed))
        items.append(Item(d.id, prefix + d.context, (d.target,), 0))
    return items


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("mmlu", "MMLU (57 subjects)", "test", "dev (first k)", "acc", _mmlu),
    TaskSpec("cmmlu", "CMMLU (67 subjects)", "test", "dev (first k)", "acc", _cmmlu),
    TaskSpec("ceval", "C-Eval (52 subjects)", "val", "dev (first k)", "acc", _ceval),
    TaskSpec("hellaswag", "HellaSwag", "validation", "validation, other items", "acc_norm", _hellaswag),
    TaskSpec("arc_easy", "ARC-Easy", "test", "validation", "acc_norm", _arc("Easy")),
    TaskSpec("arc_challenge", "ARC-Challenge", "test", "validation", "acc_norm", _arc("Challenge")),
    TaskSpec("piqa", "PIQA", "validation", "validation, other items", "acc_norm", _piqa),
    TaskSpec("winogrande", "WinoGrande (xl)", "validation", "validation, other items", "acc", _winogrande),
    TaskSpec("lambada", "LAMBADA (OpenAI)", "test", "test, other items", "acc", _lambada, greedy=True),
)}


def check_tasks(names: Sequence[str], *, data_dir: str | None = None, check_data: bool = False) -> list[str]:
    """The task names, validated (ConfigError naming the known ones), duplicates dropped.

    With ``data_dir`` given or ``check_data``, the data each task needs is located too, so that a
    missing C-Eval/CMMLU folder fails before any model is loaded."""
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ConfigError(f"unknown task {', '.join(unknown) or '(none given)'}; choose from {', '.join(TASKS)} "
                          "(comma-separated)")
    names = list(dict.fromkeys(names))
    if data_dir is not None or check_data:
        for name in names:
            if name in ("ceval", "cmmlu"):
                task_data.chinese_subjects(name, data_dir)
            else:
                task_data.olmo_root(data_dir)
    return names


def _subset_key(seed: int, task: str, item_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{task}:{item_id}".encode()).digest()


def load_items(task: str, *, shots: int | None = None, limit: int | None = None, seed: int = DEFAULT_SEED,
               data_dir: str | None = None) -> list[Item]:
    """The items of ``task`` with ``shots`` examples each (default 0), in file order, or under
    ``limit`` the deterministic subset of that many (ordered by the subset hash)."""
    (name,) = check_tasks([task])
    shots = 0 if shots is None else shots
    if shots < 0:
        raise ConfigError(f"--shots must be 0 or more, got {shots}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    items = TASKS[name].build(shots, seed, data_dir)
    if limit is not None and limit < len(items):
        items = sorted(items, key=lambda it: _subset_key(seed, name, it.id))[:limit]
    return items


def score_items(spec: TaskSpec, items: Sequence[Item], scores: Sequence[tuple[float, bool]]) -> dict[str, list[bool]]:
    """Per metric, whether each item is right, from its options' (loglik, greedy) in request order."""
    out: dict[str, list[bool]] = {"acc": []} if spec.greedy or spec.metric == "acc" else {"acc": [], "acc_norm": []}
    at = 0
    for item in items:
        option_scores = scores[at:at + item.num_options]
        at += item.num_options
        if spec.greedy:
            out["acc"].append(option_scores[0][1])
            continue
        ll = [s for s, _ in option_scores]
        out["acc"].append(_argmax(ll) == item.gold)
        if "acc_norm" in out:
            out["acc_norm"].append(_argmax([s / n for s, n in zip(ll, item.option_lengths())]) == item.gold)
    return out


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def evaluate(model, tokenizer, tasks: list[str], *, shots: int | None = None, limit: int | None = None,
             batch_size: int = 8, seed: int = DEFAULT_SEED, data_dir: str | None = None,
             progress: bool = True) -> list[TaskResult]:
    """Accuracy of ``model`` on each task (the same items for every model given the same settings)."""
    names = check_tasks(tasks)
    results = []
    for name in names:
        spec = TASKS[name]
        items = load_items(name, shots=shots, limit=limit, seed=seed, data_dir=data_dir)
        requests = [r for item in items for r in item.requests()]
        log.info("%s: %d items, %d requests", name, len(items), len(requests))
        scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress)
        by_metric = score_items(spec, items, scores)
        n = len(items)
        metrics = {}
        for metric, correct in by_metric.items():
            p = sum(correct) / n if n else float("nan")
            metrics[metric] = p
            metrics[f"{metric}_stderr"] = stderr_of_mean(p, n)
        results.append(TaskResult(
            task=name, shots=shots or 0, n=n, metric=spec.metric, accuracy=metrics[spec.metric],
            stderr=metrics[f"{spec.metric}_stderr"], item_ids=[it.id for it in items],
            correct=list(by_metric[spec.metric]),
            settings={"task": name, "shots": shots or 0, "limit": limit, "seed": seed,
                      "prompt_version": PROMPT_VERSION, "split": spec.scored_split, "metric": spec.metric},
            metrics=metrics,
        ))
    return results
