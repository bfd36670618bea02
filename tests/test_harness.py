"""lm-evaluation-harness adapter: lm-eval scoring a lowbit model agrees with lowbit's scorer.

The same (context, continuation) pairs go through lm-eval (its HFLM and a local ``dataset_path:
json`` task written by ``write_local_task``) and through ``lowbit.eval.loglik``; per request the
log-likelihoods agree to float rounding and the greedy flags exactly, so the accuracies agree
exactly. Slow tier: SmolLM2 float and W4 RTN (from disk) on ARC-Easy items.
"""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from tokenizers import processors

from lowbit import io
from lowbit.errors import ConfigError
from lowbit.eval.harness import check_agreement, harness_model, parse_results, run_harness, write_local_task
from lowbit.eval.loglik import loglikelihoods
from lowbit.eval.tasks import evaluate
from lowbit.models.load import load_model
from lowbit.models.tiny import byte_tokenizer, tiny_model
from lowbit.quantize import quantize
from lowbit.recipe import Recipe

pytest.importorskip("lm_eval")  # the `harness` extra (in `dev`); lowbit.eval.harness imports it lazily

LOGLIK_ATOL = 1e-4
"""nats; lm-eval pads on the right, lowbit on the left and shares the context's KV cache, so the
sums differ in float32 rounding only (about 1e-6 on the tiny model)."""


@dataclass(frozen=True)
class Item:
    """The fields of ``lowbit.eval.tasks.Item`` that a local task reads."""

    id: str
    context: str
    continuations: tuple[str, ...]
    gold: int


def toy_items(n: int = 16) -> list[Item]:
    """Multiple-choice items with the cases tokenization cares about: trailing spaces in the
    context (they move to the continuation), one- and many-token options, non-ASCII text."""
    rng = np.random.default_rng(0)
    words = ["red", "blue", "a cat", "the sun", "über", "三", "x", "forty-two", "no"]
    items = []
    for i in range(n):
        k = 2 + i % 3
        options = tuple(" " + words[j] for j in rng.choice(len(words), size=k, replace=False))
        context = f"Question {i}: which one fits {words[i % len(words)]}?\nAnswer:" + (" " if i % 4 == 0 else "")
        if i % 4 == 0:
            options = tuple(o[1:] for o in options)  # the context carries the space
        items.append(Item(f"toy-{i}", context, options, int(rng.integers(k))))
    return items


def lowbit_scores(model, tokenizer, items):
    """Per item, lowbit's (log-likelihood, greedy) for each option."""
    requests = [(it.context, c) for it in items for c in it.continuations]
    flat = iter(loglikelihoods(model, tokenizer, requests, batch_size=4))
    return [[next(flat) for _ in it.continuations] for it in items]


def check_toy_agreement(result, items, scores):
    """lm-eval's requests are the items' pairs; log-likelihoods, greedy flags, acc and acc_norm
    agree with lowbit's per item."""
    assert result.n == len(items) == len(result.items)
    acc, acc_norm = [], []
    for it, h, s in zip(items, result.items, scores):
        assert h.item_id == it.id
        assert h.requests == tuple((it.context, c) for c in it.continuations)
        np.testing.assert_allclose(h.loglikelihoods, [ll for ll, _ in s], rtol=0, atol=LOGLIK_ATOL)
        assert list(h.is_greedy) == [g for _, g in s]
        lls = np.array([ll for ll, _ in s])
        acc.append(float(np.argmax(lls) == it.gold))
        acc_norm.append(float(np.argmax(lls / np.array([len(c) for c in it.continuations])) == it.gold))
        assert h.metrics == {"acc": acc[-1], "acc_norm": acc_norm[-1]}
    assert result.metrics["acc"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert result.metrics["acc_norm"] == pytest.approx(np.mean(acc_norm), abs=1e-12)
    p, n = np.mean(acc), len(acc)
    assert result.stderr["acc"] == pytest.approx(np.sqrt(p * (1 - p) / (n - 1)))


@pytest.fixture
def toy_task(tmp_path):
    items = toy_items()
    write_local_task(items, tmp_path / "tasks", "toy")
    return items, tmp_path / "tasks"


def test_local_task_file(toy_task):
    items, folder = toy_task
    rows = [json.loads(line) for line in (folder / "toy.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[0] == {"id": "toy-0", "context": items[0].context, "choices": list(items[0].continuations),
                       "gold": items[0].gold}
    assert len(rows) == len(items)
    text = (folder / "toy.yaml").read_text()
    # some options lack the leading space: no delimiter, the options stored as they are
    assert "dataset_path: json" in text and "target_delimiter: ''" in text and "num_fewshot: 0" in text


def test_float_model_agrees_with_lowbit(toy_task, tokenizer):
    items, folder = toy_task
    model = tiny_model("llama", seed=0)
    (result,) = run_harness(model, tokenizer, ["toy"], include_path=folder, batch_size=4, keep_items=True,
                            progress=False)
    assert result.task == "toy" and result.num_fewshot == 0
    check_toy_agreement(result, items, lowbit_scores(model, tokenizer, items))
    assert 0 < result.metrics["acc"] < 1  # both outcomes occur, so the comparison discriminates


def test_quantized_model_from_disk_agrees_with_lowbit(toy_task, tokenizer, tmp_path):
    """A W4 model with a quantized, tied lm_head, saved and loaded: HFLM's eval() and
    tie_weights() leave it as it was, and the scores agree."""
    items, folder = toy_task
    model = tiny_model("llama", seed=1, tie_word_embeddings=True)
    quantize(model, Recipe(scheme="w4g32", method="rtn", ignore=()), progress=False)
    io.save(model, tmp_path / "w4", tokenizer=tokenizer)
    qmodel, qtokenizer = io.load(tmp_path / "w4")
    assert type(qmodel.lm_head).__name__ == "QuantizedLinear"
    ids = torch.tensor([[5, 70, 80, 90, 100, 33]])
    with torch.no_grad():
        before = qmodel(ids).logits
    (result,) = run_harness(qmodel, qtokenizer, ["toy"], include_path=folder, batch_size=3, keep_items=True,
                            progress=False)
    with torch.no_grad():
        assert torch.equal(qmodel(ids).logits, before)
    check_toy_agreement(result, items, lowbit_scores(qmodel, qtokenizer, items))


def bos_tokenizer():
    """The byte tokenizer with a post-processor that prepends <s>, as Gemma's does."""
    tok = byte_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_bos_follows_lowbit(toy_task):
    """Gemma: lm-eval prepends BOS as lowbit does, and the scores agree; Llama: neither does."""
    items, folder = toy_task
    tok = bos_tokenizer()
    gemma = tiny_model("gemma3_text", seed=0)
    lm = harness_model(gemma, tok, progress=False)
    assert lm.add_bos_token is True and lm.tok_encode("Q")[0] == tok.bos_token_id
    assert harness_model(tiny_model("llama"), tok, progress=False).tok_encode("Q")[0] != tok.bos_token_id
    (result,) = run_harness(gemma, tok, ["toy"], include_path=folder, batch_size=4, keep_items=True,
                            progress=False)
    check_toy_agreement(result, items, lowbit_scores(gemma, tok, items))


def test_limit_takes_the_first_documents(toy_task, tokenizer):
    items, folder = toy_task
    (result,) = run_harness(tiny_model("llama"), tokenizer, ["toy"], include_path=folder, limit=5,
                            keep_items=True, progress=False)
    assert result.n == 5 and [h.item_id for h in result.items] == [it.id for it in items[:5]]
    assert json.loads(json.dumps(result.to_dict()))["items"][0]["item_id"] == "toy-0"


def test_errors(tmp_path, tokenizer):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="no lm-eval task"):
        run_harness(model, tokenizer, [" "])
    with pytest.raises(ConfigError, match="does not exist"):
        run_harness(model, tokenizer, ["toy"], include_path=tmp_path / "missing")
    with pytest.raises(ConfigError, match="PreTrainedModel"):
        harness_model(torch.nn.Linear(2, 2), tokenizer)
    with pytest.raises(ConfigError, match="gold 3"):
        write_local_task([Item("a", "Q:", (" x", " y"), 3)], tmp_path, "bad")
    with pytest.raises(ConfigError, match="task name"):
        write_local_task([Item("a", "Q:", (" x", " y"), 0)], tmp_path, "a b")


@pytest.mark.parametrize("task, shots", [("arc_easy", 1), ("mmlu", 0), ("winogrande", 0), ("lambada", 0)])
def test_lowbit_tasks_agree(task, shots, tmp_path, tokenizer):
    """lowbit's own items in each shape (options as continuations with acc_norm, letters, options
    in the context, greedy last word) through lm-eval give lowbit's scores."""
    model = tiny_model("llama", seed=0)
    a = check_agreement(model, tokenizer, task, tmp_path, shots=shots, limit=6, batch_size=4, progress=False)
    assert a.n == 6 and a.requests >= 6
    assert a.max_loglik_difference < LOGLIK_ATOL
    assert a.greedy_mismatches == 0 and a.disagreeing_items == []
    assert a.harness_accuracy == a.lowbit_accuracy
    (ours,) = evaluate(model, tokenizer, [task], shots=shots, limit=6, batch_size=4, progress=False)
    assert ours.accuracy == a.lowbit_accuracy and ours.metric == a.metric  # the check's lowbit side is evaluate's
    text = (tmp_path / f"lowbit_{task}.yaml").read_text()
    if task in ("arc_easy", "mmlu"):  # every option starts with a space: it becomes the delimiter
        assert "target_delimiter: ' '" in text and "acc_norm" in text


def test_unknown_task(tokenizer, toy_task):
    """An unknown name fails before any data is read, naming where tasks were looked for."""
    _, folder = toy_task
    with pytest.raises(ConfigError, match=f"unknown lm-eval task no_such_task: .* or in {folder}"):
        run_harness(tiny_model("llama"), tokenizer, ["toy", "no_such_task"], include_path=folder, progress=False)


def test_hub_task_offline(tokenizer, tmp_path):
    """Offline (conftest sets HF_DATASETS_OFFLINE), a task whose data is on the hub (here lm-eval's
    own arc_easy definition, copied) fails in one line naming the local-task recipe."""
    (tmp_path / "hub_arc.yaml").write_text(
        "task: hub_arc\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: 'Question: {{question}}\\nAnswer:'\n"
        "doc_to_target: '{{choices.label.index(answerKey)}}'\n"
        "doc_to_choice: '{{choices.text}}'\nmetric_list:\n  - metric: acc\n")
    with pytest.raises(ConfigError, match="local task"):
        run_harness(tiny_model("llama"), tokenizer, ["hub_arc"], include_path=tmp_path, limit=2, progress=False)


def test_parse_results_names_filters_and_groups():
    out = {
        "results": {
            "g": {"alias": "g", "acc,none": 0.5, "acc_stderr,none": "N/A"},
            "t": {"alias": " - t", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                  "acc,none": np.float64(0.75), "acc_stderr,none": 0.05},
        },
        "groups": {"g": {}},
        "n-samples": {"t": {"original": 10, "effective": 4}},
        "n-shot": {"t": 5},
    }
    g, t = parse_results(out)
    assert (g.task, g.is_group, g.n, g.num_fewshot, g.metrics, g.stderr) == ("g", True, None, None, {"acc": 0.5},
                                                                            {"acc": None})
    assert (t.n, t.num_fewshot) == (4, 5)
    assert t.metrics == {"exact_match,strict-match": 0.25, "acc": 0.75}
    assert t.stderr == {"exact_match,strict-match": 0.1, "acc": 0.05}
    assert type(t.metrics["acc"]) is float
    json.dumps([g.to_dict(), t.to_dict()])


def test_cli(tmp_path, toy_task):
    """`lowbit harness`: lm-eval tasks from --include-path, and --lowbit-tasks with the
    agreement check, in one JSON object."""
    from typer.testing import CliRunner

    from lowbit.cli import app

    _, folder = toy_task
    model_dir = tmp_path / "tiny"
    tiny_model("llama", seed=0).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    r = CliRunner().invoke(app, ["harness", str(model_dir), "--tasks", "toy", "--include-path", str(folder),
                                 "--lowbit-tasks", "arc_easy", "--limit", "4", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["kind"] == "harness" and [x["task"] for x in out["results"]] == ["toy"]
    assert out["results"][0]["n"] == 4 and set(out["results"][0]["metrics"]) == {"acc", "acc_norm"}
    (a,) = out["agreement"]
    assert a["task"] == "arc_easy" and a["n"] == 4 and a["lowbit_accuracy"] == a["harness_accuracy"]
    r = CliRunner().invoke(app, ["harness", str(model_dir)])
    assert r.exit_code == 2 and "--lowbit-tasks" in r.output


@pytest.fixture(scope="module")
def smol_float_and_w4(tmp_path_factory):
    """SmolLM2-135M float, and its W4 g128 RTN quantization saved and loaded back from disk."""
    model, tokenizer = load_model("smollm2-135m")
    folder = tmp_path_factory.mktemp("harness") / "w4"
    w4, _ = load_model("smollm2-135m")
    quantize(w4, Recipe(scheme="w4g128", method="rtn"), progress=False)
    io.save(w4, folder, tokenizer=tokenizer)
    del w4
    return (model, tokenizer), io.load(folder)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["float", "w4"])
def test_smollm2_arc_easy_agrees(which, smol_float_and_w4, tmp_path):
    """30 ARC-Easy items (lowbit's subset, 0-shot) through lm-eval's HFLM and a local json task:
    the same acc_norm as lowbit's scorer, item by item (measured: 0.500 float, 0.567 W4 RTN;
    largest log-likelihood difference 4e-5 nats over 120 requests)."""
    model, tokenizer = smol_float_and_w4[0 if which == "float" else 1]
    if which == "w4":
        assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    a = check_agreement(model, tokenizer, "arc_easy", tmp_path, limit=30, batch_size=8, progress=False)
    assert (a.n, a.requests, a.metric) == (30, 120, "acc_norm")
    assert a.harness_accuracy == a.lowbit_accuracy
    assert a.disagreeing_items == [] and a.greedy_mismatches == 0
    assert a.max_loglik_difference < 1e-3
