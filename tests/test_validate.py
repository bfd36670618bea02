"""The budget gate: paired statistics, verdicts, budget parsing and the baseline cache."""

import math
from dataclasses import dataclass, field

import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.eval.validate import ResultCache, compare_results, mcnemar_p, model_fingerprint, parse_budget


@dataclass
class Result:
    """The fields of ``TaskResult`` that the gate reads."""

    correct: list[bool]
    task: str = "t"
    metric: str = "acc"
    stderr: float = 0.0
    item_ids: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.item_ids = self.item_ids or [str(i) for i in range(len(self.correct))]


def pair(base_only: int, quant_only: int, both_right: int, both_wrong: int):
    base = [True] * base_only + [False] * quant_only + [True] * both_right + [False] * both_wrong
    quant = [False] * base_only + [True] * quant_only + [True] * both_right + [False] * both_wrong
    return Result(base), Result(quant)


def test_mcnemar_exact_values():
    # b=10, c=2: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    assert mcnemar_p(10, 2) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_p(2, 10) == mcnemar_p(10, 2)
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(0, 30) == pytest.approx(2 / 2**30)


def test_paired_statistics_match_the_definition():
    base, quant = pair(7, 3, 50, 40)
    row = compare_results(base, quant, 0.02)
    d = torch.tensor(quant.correct, dtype=torch.float64) - torch.tensor(base.correct, dtype=torch.float64)
    assert row.n == 100
    assert row.baseline_accuracy == pytest.approx(0.57) and row.accuracy == pytest.approx(0.53)
    assert row.change == pytest.approx(-0.04)
    assert row.relative_change == pytest.approx(-0.04 / 0.57)
    assert row.recovery == pytest.approx(100 * 0.53 / 0.57)
    assert row.paired_stderr == pytest.approx(float(d.std()) / 10)
    assert (row.baseline_only, row.quantized_only) == (7, 3)
    assert row.p_value == pytest.approx(mcnemar_p(7, 3))
    # with 10% discordant items the paired error is below even one accuracy's own error
    assert row.paired_stderr < math.sqrt(0.57 * 0.43 / 99)


@pytest.mark.parametrize("counts, budget, verdict", [
    ((0, 0, 60, 40), 0.02, "pass"),      # identical answers
    ((1, 0, 59, 40), 0.02, "pass"),      # loses 1 point of 60: 1.7% relative, within 2%
    ((2, 0, 58, 40), 0.02, "noise"),     # 3.3% relative but only two discordant items
    ((40, 0, 40, 20), 0.02, "fail"),     # loses half its accuracy on 40 items
    ((40, 0, 40, 20), 0.6, "pass"),      # ... which a 60% budget accepts
    ((0, 10, 50, 40), 0.0, "pass"),      # gains are never a loss
])
def test_verdicts(counts, budget, verdict):
    base, quant = pair(*counts)
    assert compare_results(base, quant, budget).verdict == verdict


def test_fail_needs_the_loss_beyond_noise():
    # the same 5-point loss: with 8 discordant items of 100 it is noise, on 2,000 items a failure
    small = compare_results(*pair(6, 1, 54, 39), 0.02)
    large = compare_results(*pair(120, 20, 1080, 780), 0.02)
    assert small.change == pytest.approx(large.change)
    assert (small.verdict, large.verdict) == ("noise", "fail")


def test_mismatched_items_are_refused():
    base, quant = pair(1, 1, 5, 5)
    quant.item_ids = list(reversed(quant.item_ids))
    with pytest.raises(ConfigError, match="different items"):
        compare_results(base, quant, 0.02)


@pytest.mark.parametrize("text, value", [("2%", 0.02), ("0.5%", 0.005), ("0.02", 0.02), ("0", 0.0), (" 5% ", 0.05)])
def test_parse_budget(text, value):
    assert parse_budget(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["2", "abc", "-1%", "100%", "nan"])
def test_parse_budget_refuses(text):
    with pytest.raises(ConfigError, match="budget"):
        parse_budget(text)


def test_fingerprint_follows_the_weights(tiny_llama):
    a = model_fingerprint(tiny_llama)
    assert a == model_fingerprint(tiny_llama)
    with torch.no_grad():
        next(tiny_llama.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(tiny_llama) != a


def test_cache_round_trip(tmp_path):
    cache = ResultCache(tmp_path / "c")
    settings = {"task": "arc_easy", "shots": 0, "limit": 10, "seed": 1}
    assert cache.get("f" * 64, settings) is None
    cache.put("f" * 64, settings, {"accuracy": 0.5})
    assert cache.get("f" * 64, settings) == {"accuracy": 0.5}
    assert cache.get("f" * 64, {**settings, "limit": 11}) is None
    assert cache.get("e" * 64, settings) is None
    assert not list((tmp_path / "c").glob("*.tmp"))


def test_unwritable_cache_is_not_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ResultCache(blocker / "sub").put("f" * 64, {"task": "t"}, {"accuracy": 0.5})  # no exception


# ---------------------------------------------------------------------------------------------
# The command


def _tiny_folder(root):
    from lowbit.models.tiny import byte_tokenizer, tiny_model

    folder = root / "tiny"
    tiny_model(seed=11).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_validate_against_itself_passes_and_caches_the_baseline(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from lowbit.cli import app

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    folder = _tiny_folder(tmp_path)
    args = ["validate", str(folder), "--baseline", str(folder), "--tasks", "arc_easy,lambada", "--limit", "4",
            "--tokens", "64", "--json", "--quiet"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["kind"] == "validate" and out["passed"] is True
    assert [t["task"] for t in out["tasks"]] == ["arc_easy", "lambada"]
    for t in out["tasks"]:
        assert t["n"] == 4 and t["change"] == 0 and t["verdict"] == "pass" and t["p_value"] == 1.0
    assert out["fidelity"]["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    cached = list((tmp_path / "cache" / "tasks").glob("*.json"))
    assert len(cached) == 2
    r = CliRunner().invoke(app, args[:-2] + ["--quiet"])
    assert r.exit_code == 0 and "read from the cache: arc_easy, lambada" in r.output


def test_validate_exits_1_when_a_task_fails(tmp_path, monkeypatch):
    """The exit status follows the verdicts (the gate itself is tested above on exact counts)."""
    from typer.testing import CliRunner

    import lowbit.eval.validate as validate
    from lowbit.cli import app
    from lowbit.eval.tasks import TaskResult

    def fake(model, tokenizer, tasks, cache, **_):
        right = [True] * 40 + [False] * 10
        wrong = [False] * 40 + [False] * 10
        correct = right if cache is not None else wrong
        return [TaskResult(task=t, shots=0, n=50, metric="acc", accuracy=sum(correct) / 50, stderr=0.05,
                           item_ids=[str(i) for i in range(50)], correct=correct, settings={}) for t in tasks], []

    monkeypatch.setattr(validate, "evaluate_cached", fake)
    folder = _tiny_folder(tmp_path)
    r = CliRunner().invoke(app, ["validate", str(folder), "--baseline", str(folder), "--tasks", "arc_easy",
                                 "--tokens", "0", "--quiet"])
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output and "arc_easy" in r.output


def test_validate_refuses_a_bad_budget_before_loading(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    r = CliRunner().invoke(app, ["validate", str(tmp_path / "missing"), "--baseline", str(tmp_path / "missing"),
                                 "--budget", "two"])
    assert r.exit_code == 2 and "--budget" in r.output


@pytest.mark.slow
def test_smollm2_gate_fails_a_2bit_model_and_passes_w8(tmp_path):
    """Real model, real items: RTN w2 (near chance) must fail the 2% gate on ARC-Easy; w8 must not."""
    import json

    from typer.testing import CliRunner

    from lowbit import io
    from lowbit.cli import app
    from lowbit.models.load import load_model
    from lowbit.quantize import quantize
    from lowbit.recipe import Recipe

    verdicts = {}
    for scheme in ("w2g64", "w8"):
        model, tokenizer = load_model("smollm2-135m")
        recipe = Recipe(scheme=scheme, method="rtn")
        quantize(model, recipe)
        io.save(model, tmp_path / scheme, tokenizer=tokenizer, recipe=recipe)
        r = CliRunner().invoke(app, ["validate", str(tmp_path / scheme), "--baseline", "smollm2-135m",
                                     "--tasks", "arc_easy", "--limit", "80", "--tokens", "0", "--json", "--quiet"])
        verdicts[scheme] = (r.exit_code, json.loads(r.stdout)["tasks"][0])
    code, row = verdicts["w2g64"]
    assert code == 1 and row["verdict"] == "fail" and row["baseline_accuracy"] > 0.4, row
    code, row = verdicts["w8"]
    assert code == 0 and row["verdict"] in ("pass", "noise") and row["recovery"] > 90, row
