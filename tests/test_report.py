"""``lowbit report``: reading runs, the clipping measures against hand-computed ranges, which
sections exist, and the page rendered in headless Chromium (every figure present and non-blank,
no console errors).

The runs come from a tiny model: GPTQ and RTN quantized through the Python API and saved with
``io.save`` into a hand-made compare folder, plus one real ``lowbit compare --keep`` run; the
task, validate, bench and chat JSON are written by hand in the shapes those commands print.
"""

import base64
import glob
import io as bytes_io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg
from typer.testing import CliRunner

from lowbit import io
from lowbit.cli import app
from lowbit.core.args import QuantArgs
from lowbit.core.formats import get_format
from lowbit.core.quantize import quantize as quantize_tensor
from lowbit.data.calibration import CalibrationSpec, calibration_tokens
from lowbit.errors import ConfigError
from lowbit.models.tiny import byte_tokenizer, tiny_model
from lowbit.quantize import quantize
from lowbit.recipe import Recipe
from lowbit.report import build_report, collect, read_peers, write_report
from lowbit.report.clipping import (
    activation_clipping,
    activation_inputs,
    captured_inputs,
    edge_tolerance,
    representable_range,
    weight_clipping,
)
from lowbit.report.collect import layer_errors
from lowbit.report.tables import bench_table, runs_table

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
PEERS_FILE = REPO / "benchmarks" / "peers_smollm2_135m.json"
SEED = 11


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


# -- fixtures: a tiny model, two quantized runs, the other commands' JSON -------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    model_dir = root / "tiny"
    tiny_model(seed=SEED).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text = root / "text.txt"
    text.write_text("\n\n".join(
        f"Paragraph {i}: the quick brown fox jumps over the lazy dog while counting {i * 7} "
        "sheep, and the river keeps running past the old mill toward the sea." * 3
        for i in range(40)
    ))
    calibration = CalibrationSpec(source=str(text), num_samples=4, seq_len=32)
    compare_dir = root / "compare"
    for scheme, method in (("w4g32", "gptq"), ("w8", "rtn")):
        model, tokenizer = tiny_model(seed=SEED), byte_tokenizer()
        recipe = Recipe(scheme=scheme, method=method)
        report = quantize(model, recipe, calibration_tokens(calibration, tokenizer), progress=False)
        io.save(model, compare_dir / f"{scheme}-{method}", tokenizer=tokenizer, recipe=recipe,
                report=report.to_dict())
    rtn = root / "rtn-nocalib"  # data-free: the report has no output errors, only RTN's weight MSE
    model = tiny_model(seed=SEED)
    recipe = Recipe(scheme="w4g32", method="rtn")
    report = quantize(model, recipe, progress=False)
    io.save(model, rtn, tokenizer=byte_tokenizer(), recipe=recipe, report=report.to_dict())
    rows = [dict(scheme="w4g32", method="gptq", bits_per_weight=4.5, quantized_mb=0.1, seconds=1.0,
                 peak_rss_mb=500.0, output_error=0.01, perplexity=260.5, ppl_change_pct=1.2, mean_kl=0.0123,
                 p99_kl=0.05, top1_agreement=0.93),
            dict(scheme="w8", method="rtn", bits_per_weight=8.25, quantized_mb=0.2, seconds=0.1,
                 peak_rss_mb=400.0, output_error=0.0001, perplexity=257.6, ppl_change_pct=0.01, mean_kl=0.00021,
                 p99_kl=0.001, top1_agreement=0.995)]
    (compare_dir / "compare.json").write_text(json.dumps({
        "kind": "compare", "model": str(model_dir), "baseline_perplexity": 257.4, "tokens_scored": 252,
        "window": 64, "source": str(text), "calibration": calibration.to_dict(), "outputs": str(compare_dir),
        "rows": rows}))
    gptq = str(compare_dir / "w4g32-gptq")
    jsons = {
        "tasks": {"kind": "tasks", "model": gptq, "results": [
            _task("mmlu", 0.30, 200), _task("arc_easy", 0.40, 100)]},
        "tasks_float": {"kind": "tasks", "model": str(model_dir), "results": [
            _task("mmlu", 0.32, 200), _task("arc_easy", 0.41, 100)]},
        "validate": {"kind": "validate", "model": gptq, "baseline": str(model_dir), "budget": 0.02, "tasks": [
            dict(task="mmlu", metric="acc", n=200, baseline_accuracy=0.32, accuracy=0.30, baseline_stderr=0.033,
                 stderr=0.032, change=-0.02, relative_change=-0.0625, recovery=93.75, paired_stderr=0.01,
                 baseline_only=6, quantized_only=2, p_value=0.289, allowed_loss=0.0064, verdict="fail"),
            dict(task="arc_easy", metric="acc_norm", n=100, baseline_accuracy=0.41, accuracy=0.40,
                 baseline_stderr=0.049, stderr=0.049, change=-0.01, relative_change=-0.0244, recovery=97.56,
                 paired_stderr=0.014, baseline_only=2, quantized_only=1, p_value=1.0, allowed_loss=0.0082,
                 verdict="noise")]},
        "bench": {"kind": "bench", "baseline": str(model_dir), "rows": [
            _bench_row(str(model_dir), True, 600.0, 40.0, {}),
            _bench_row(gptq, False, 300.0, 30.0, {"load_seconds": 0.8, "rss_mb": 0.5, "weight_mb": 0.3,
                                                 "peak_rss_mb": 0.6, "prefill_b1": 0.9, "decode_b1": 0.75,
                                                 "ttft_b1": 1.1, "prefill_b8": 0.95, "decode_b8": 0.7,
                                                 "ttft_b8": float("nan")})],
                  "settings": {"batch_sizes": [1, 8]}},
        "chat": {"kind": "chat", "model": gptq, "baseline": str(model_dir), "max_new_tokens": 64,
                 "prompt_version": 1, "prompts": [
            {"id": "en_fact", "prompt": "What is the capital of France?", "baseline_answer": "Paris.",
             "answer": "Paris, <of course>.", "common_prefix_tokens": 1, "first16_match": False,
             "baseline_tokens": 3, "tokens": 6,
             "checks": {"baseline": {"expect": True}, "model": {"expect": True}}},
            {"id": "code_add", "prompt": "Write a Python function add(a, b).",
             "baseline_answer": "def add(a, b):\n    return a + b", "answer": "def add(a, b):\n    return a - b",
             "common_prefix_tokens": 12, "first16_match": False, "baseline_tokens": 14, "tokens": 14,
             "checks": {"baseline": {"code_passes": True}, "model": {"code_passes": False}}}]},
    }
    files = {}
    for name, data in jsons.items():
        files[name] = root / f"{name}.json"
        files[name].write_text(json.dumps(data))
    return {"root": root, "model_dir": model_dir, "text": text, "compare": compare_dir, "rtn": rtn, **files}


def _bench_row(model, baseline, rss_mb, decode, ratios):
    """A row as ``lowbit bench --json`` prints it (``BenchRow.to_dict()``)."""
    speeds = [{"batch": b, "prefill_tokens_per_s": 500.0 * b, "decode_tokens_per_s": decode * b,
               "ttft_seconds": 0.05} for b in (1, 8)]
    if baseline:
        ratios = {k: 1.0 for k in ("load_seconds", "rss_mb", "weight_mb", "peak_rss_mb", "prefill_b1", "decode_b1",
                                   "ttft_b1", "prefill_b8", "decode_b8", "ttft_b8")}
    return {"model": model, "baseline": baseline, "load_seconds": 0.5, "rss_mb": rss_mb, "weight_mb": 1.0,
            "peak_rss_mb": rss_mb, "speeds": speeds, "kernels": {} if baseline else {"dequant": 14},
            "ratios": ratios}


def _task(task, accuracy, n):
    stderr = (accuracy * (1 - accuracy) / (n - 1)) ** 0.5
    return {"task": task, "shots": 0, "n": n, "metric": "acc", "accuracy": accuracy, "stderr": stderr,
            "item_ids": [], "correct": [], "settings": {}}


def all_inputs(ws):
    return [ws["compare"], ws["tasks"], ws["tasks_float"], ws["validate"], ws["bench"], ws["chat"]]


@pytest.fixture(scope="module")
def full_report(workspace):
    """Every input, the peers and the float model: every section of the page."""
    return build_report(collect(all_inputs(workspace)), peers=read_peers(PEERS_FILE),
                        baseline=(tiny_model(seed=SEED), byte_tokenizer()), source=str(workspace["text"]))


# -- reading runs -------------------------------------------------------------------------------


def test_inputs_join_into_one_row_per_model(workspace):
    collection = collect(all_inputs(workspace))
    labels = [r.label for r in collection.ordered()]
    assert labels == ["tiny", "w4g32-gptq", "w8-rtn"]  # the float model first, each model once
    table = runs_table(collection)
    assert table.headers == ["run", "method", "scheme", "size MB", "bits/weight", "RSS x", "weights x",
                             "decode b1 x", "decode b8 x", "perplexity", "ppl change", "mean KL", "KL p99", "top-1",
                             "mmlu", "arc_easy", "budget"]
    rows = {row[0]: dict(zip(table.headers, row)) for row in table.rows}
    gptq = rows["w4g32-gptq"]
    assert (gptq["method"], gptq["scheme"], gptq["bits/weight"]) == ("gptq", "w4g32", "4.500")
    assert (gptq["RSS x"], gptq["weights x"], gptq["decode b1 x"], gptq["decode b8 x"]) == (
        "0.50x", "0.30x", "0.75x", "0.70x")
    assert rows["tiny (float)"]["decode b1 x"] == "1.00x" and rows["w8-rtn"]["decode b1 x"] == ""
    speed = bench_table(collection)
    assert speed.headers == ["run", "load time x", "RSS x", "weights x", "peak RSS x", "prefill b1 x", "decode b1 x",
                             "TTFT b1 x", "prefill b8 x", "decode b8 x", "TTFT b8 x"]
    assert speed.rows[1] == ["w4g32-gptq", "0.80x", "0.50x", "0.30x", "0.60x", "0.90x", "0.75x", "1.10x", "0.95x",
                             "0.70x", ""]  # NaN (no baseline figure) is an empty cell
    assert (gptq["mean KL"], gptq["top-1"], gptq["ppl change"]) == ("0.0123", "0.930", "+1.20%")
    assert gptq["mmlu"] == "30.0 ± 3.2" and gptq["budget"] == "FAIL (2.0% budget)"
    assert rows["tiny (float)"]["mmlu"] == "32.0 ± 3.3" and rows["tiny (float)"]["perplexity"] == "257.400"
    assert rows["w8-rtn"]["budget"] == "" and rows["w8-rtn"]["mmlu"] == ""
    assert table.emphasis == [True, False, False]
    info = io.read_quantization_config(workspace["compare"] / "w4g32-gptq")
    assert float(gptq["size MB"]) == pytest.approx(
        sum(f["bytes"] for f in info["files"].values()) / 1e6, abs=0.06)


def test_validate_verdict_is_the_worst_task_unless_stated(workspace, tmp_path):
    data = json.loads(workspace["validate"].read_text())
    collection = collect([workspace["validate"]])
    [run] = collection.quantized()
    assert run.verdict.verdict == "fail" and run.verdict.budget == 0.02
    data["tasks"][0]["verdict"] = "pass"
    (tmp_path / "v.json").write_text(json.dumps(data))
    assert collect([tmp_path / "v.json"]).quantized()[0].verdict.verdict == "noise"
    data["passed"] = True  # lowbit validate passes on "noise"; the page says over budget, within noise
    (tmp_path / "v.json").write_text(json.dumps(data))
    assert collect([tmp_path / "v.json"]).quantized()[0].verdict.verdict == "noise"
    for row in data["tasks"]:
        del row["verdict"]
    (tmp_path / "v.json").write_text(json.dumps(data))
    assert collect([tmp_path / "v.json"]).quantized()[0].verdict.verdict == "pass"


def test_eval_json_without_kind_is_read(tmp_path):
    rows = [{"model": "smollm2-135m", "size_mb": 538.0, "bits_per_weight": None, "perplexity": 33.07,
             "ppl_change_pct": 0.0, "mean_kl": 0.0, "p99_kl": 0.0, "top1_agreement": 1.0},
            {"model": "out/w4", "size_mb": 170.1, "bits_per_weight": 4.135, "perplexity": 46.4,
             "ppl_change_pct": 40.5, "mean_kl": 0.41, "p99_kl": 3.37, "top1_agreement": 0.671}]
    file = tmp_path / "eval.json"
    file.write_text(json.dumps({"tokens_scored": 4088, "window": 512, "stride": 512, "source": "wiki", "rows": rows}))
    collection = collect([file])
    base, quant = collection.ordered()
    assert base.baseline and base.label == "smollm2-135m" and not quant.baseline
    assert quant.fidelity.mean_kl == 0.41 and quant.bits_per_weight == 4.135 and quant.size_mb == 170.1
    assert collection.eval_settings == {"tokens_scored": 4088, "window": 512, "stride": 512, "source": "wiki"}


def test_compare_json_without_kind_is_read_as_compare(workspace, tmp_path):
    data = json.loads((workspace["compare"] / "compare.json").read_text())
    del data["kind"]
    file = workspace["compare"] / "old-compare.json"  # beside the run folders, as --json > file writes it
    file.write_text(json.dumps(data))
    try:
        runs = collect([file]).quantized()
    finally:
        file.unlink()
    folder = workspace["compare"]
    assert [(r.label, r.folder, r.fidelity.mean_kl) for r in runs] == [
        ("w4g32-gptq", folder / "w4g32-gptq", 0.0123), ("w8-rtn", folder / "w8-rtn", 0.00021)]


def test_harness_results_get_their_own_columns(tmp_path):
    file = tmp_path / "harness.json"
    file.write_text(json.dumps({"kind": "harness", "model": "out/w4", "results": [
        {"task": "arc_easy", "num_fewshot": 0, "n": 50, "is_group": False, "metrics": {"acc": 0.5, "acc_norm": 0.46},
         "stderr": {"acc": 0.07, "acc_norm": 0.071}},
        {"task": "piqa", "num_fewshot": 0, "n": 50, "is_group": False, "metrics": {"acc": 0.6}, "stderr": {}},
        {"task": "group", "num_fewshot": None, "n": None, "is_group": True, "metrics": {"acc": 0.55}, "stderr": {}}]}))
    [run] = collect([file]).runs
    assert {k: (t.accuracy, t.stderr, t.metric) for k, t in run.tasks.items()} == {
        "arc_easy (lm-eval)": (0.46, 0.071, "acc_norm"), "piqa (lm-eval)": (0.6, None, "acc")}


def test_unknown_inputs_are_refused_in_one_line(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"kind": "weather"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "empty").mkdir()
    for path, words in ((tmp_path / "x.json", "unknown kind 'weather'"), (tmp_path / "list.json", "JSON list"),
                        (tmp_path / "empty", "neither compare.json"), (tmp_path / "nope", "does not exist")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            collect([path])


def test_layer_errors_by_decoder_layer_and_kind(workspace):
    report = json.loads((workspace["compare"] / "w4g32-gptq" / "lowbit_report.json").read_text())
    metric, layers = layer_errors(report)
    assert metric == "output_error"
    assert [(e.layer, e.kind) for e in layers[:7]] == [
        (0, "q_proj"), (0, "k_proj"), (0, "v_proj"), (0, "o_proj"), (0, "gate_proj"), (0, "up_proj"), (0, "down_proj")]
    assert {e.layer for e in layers} == {0, 1}
    assert [e.value for e in layers] == [r["output_error"] for r in report["layers"]]
    rtn = json.loads((workspace["rtn"] / "lowbit_report.json").read_text())
    metric, layers = layer_errors(rtn)
    assert metric == "weight_mse" and [e.value for e in layers] == [r["objective_value"] for r in rtn["layers"]]


def test_peers_from_json_and_csv(tmp_path):
    peers = read_peers(PEERS_FILE)
    assert len(peers.points) == 20 and "not lowbit's default evaluation text" in peers.note
    iq4 = next(p for p in peers.points if p.name.startswith("llama.cpp IQ4_NL"))
    assert (iq4.bits, iq4.kl) == (4.50, 0.087)  # PEERS.md, "Fidelity: the numbers to beat"
    (tmp_path / "p.csv").write_text("name,size_mb,kl\nfoo,70.5,0.2\n")
    assert read_peers(tmp_path / "p.csv").points[0].size_mb == 70.5
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "x", "kl": 0.1}]))
    with pytest.raises(ConfigError, match="needs kl and bits"):
        read_peers(tmp_path / "bad.json")


# -- clipping measures against hand-computed ranges ----------------------------------------------


def test_representable_range_is_the_extreme_codes_under_each_scale():
    torch.manual_seed(0)
    w = torch.randn(6, 96)
    sym = quantize_tensor(w, QuantArgs(group_size=32))
    lo, hi = representable_range(sym)
    s = sym.scale.float().repeat_interleave(32, dim=1)
    assert torch.equal(lo, -8 * s) and torch.equal(hi, 7 * s)
    asym = quantize_tensor(w, QuantArgs(symmetric=False, group_size=32))
    lo, hi = representable_range(asym)
    s = asym.scale.float().repeat_interleave(32, dim=1)
    z = asym.zero_point.float().repeat_interleave(32, dim=1)
    assert torch.equal(lo, (0 - z) * s) and torch.equal(hi, (15 - z) * s)
    nf4 = quantize_tensor(w, QuantArgs(format="nf4", group_size=32))
    lo, hi = representable_range(nf4)
    s = nf4.scale.float().repeat_interleave(32, dim=1)
    levels = get_format("nf4").levels
    assert torch.equal(lo, min(levels) * s) and torch.equal(hi, max(levels) * s)


def test_clipped_share_and_reach_of_a_narrowed_range():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    args = QuantArgs(granularity="channel", group_size=None)
    full = weight_clipping("x", w, quantize_tensor(w, args))
    assert full.clipped_fraction == 0 and full.reach.min() >= 1 - 1e-3  # min-max reaches every extreme
    absmax = w.abs().amax(1, keepdim=True)
    half = quantize_tensor(w, args, -absmax / 2, absmax / 2)  # a grid ending at half of each row's absmax
    clip = weight_clipping("x", w, half)
    s = half.scale.float()
    lo, hi = -8 * s, 7 * s
    t = edge_tolerance(half.format) * (hi - lo)
    expected = ((w < lo - t) | (w > hi + t)).float().mean().item()
    assert clip.clipped_fraction == pytest.approx(expected, abs=1e-6) and expected > 0.1
    reach = torch.minimum(hi[:, 0] / w.amax(1), lo[:, 0] / w.amin(1))
    assert np.allclose(np.sort(clip.reach), np.sort(reach.numpy()), rtol=1e-5)


def test_a_transformed_weight_matches_only_after_per_column_scaling():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    scales = torch.linspace(0.2, 5.0, 64)
    qt = quantize_tensor(w * scales, QuantArgs(group_size=32))
    assert weight_clipping("x", w, qt) is None  # the float weight is not what was quantized
    assert weight_clipping("x", w, qt, rescale=True) is not None
    assert weight_clipping("x", torch.randn(16, 64), quantize_tensor(w, QuantArgs(group_size=32))) is None


def test_activation_capture_sees_each_linear_input_and_removes_its_hooks(tokenizer):
    model = tiny_model(seed=SEED)
    ids = torch.tensor([tokenizer("the river runs past the old mill")["input_ids"]])
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    seen = {}

    def record(module, args, out):
        seen["norm"] = out.detach().reshape(-1, out.shape[-1])

    handle = model.model.layers[0].input_layernorm.register_forward_hook(record)
    inputs = activation_inputs(model, ids, names)
    handle.remove()
    assert torch.equal(inputs[names[0]], seen["norm"]) and torch.equal(inputs[names[1]], seen["norm"])
    assert inputs[names[2]].shape == (ids.shape[1], 160)
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError), captured_inputs(model, names[:1], 4):
        raise RuntimeError("stopped")
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_activation_ranges_of_static_and_dynamic_schemes():
    x = torch.tensor([[1.0, -3.0, 0.5], [2.0, 0.25, -0.5], [-6.0, 1.0, 1.0]])
    static = QuantArgs(format="int8", granularity="tensor", group_size=None)
    dynamic = QuantArgs(format="int8", granularity="token", group_size=None, dynamic=True)
    act = activation_clipping("x", x, [("a", static), ("b", dynamic), ("c", None)])
    assert [(r.low, r.high) for r in act.ranges] == [(-6.0, 6.0), (-3.0, 3.0)]  # absmax; median token absmax
    assert act.absmax == 6.0 and sorted(act.values.tolist()) == sorted(x.reshape(-1).tolist())


# -- sections: present when fed, absent otherwise -------------------------------------------------


def test_sections_follow_the_inputs(workspace, full_report):
    lone = build_report(collect([workspace["rtn"]]))
    assert [s.id for s in lone.sections] == ["runs", "layers", "worst-layers"]  # no fidelity: no size-KL plot
    assert [p.id for p in lone.sections[-1].plots] == ["codes"]
    jsons = build_report(collect([workspace["tasks"], workspace["bench"]]))
    assert [s.id for s in jsons.sections] == ["runs"]  # no layers, no KL: tables only
    full = full_report
    ids = [s.id for s in full.sections]
    assert ids == ["runs", "validate-w4g32-gptq", "size-kl", "layers", "worst-layers", "chat-1"]
    worst = full.sections[ids.index("worst-layers")]
    assert [p.id for p in worst.plots] == ["weights", "reach", "activations"]
    size_kl = full.sections[ids.index("size-kl")]
    assert "Grey squares: 20 peers" in size_kl.plots[0].caption and len(size_kl.appendix[0][1].rows) == 20
    assert [t for t, _ in full.sections[0].tables] == ["", "Speed and memory (ratio to the float model)"]
    chat = full.sections[-1].chat
    assert chat.title == "tiny vs w4g32-gptq" and [i.id for i in chat.items] == ["en_fact", "code_add"]
    code = chat.items[1]
    assert code.answers == {"baseline answer": "def add(a, b):\n    return a + b",
                            "answer": "def add(a, b):\n    return a - b"}
    assert code.checks["code passes (baseline / model)"] == "yes / no" and code.checks["common prefix tokens"] == 12


def test_a_wrong_baseline_is_named_not_drawn(workspace):
    built = build_report(collect([workspace["compare"]]), baseline=(tiny_model(seed=SEED + 1), byte_tokenizer()),
                         source=str(workspace["text"]))
    worst = next(s for s in built.sections if s.id == "worst-layers")
    assert [p.id for p in worst.plots] == ["activations"]
    assert any("no float weight matching" in t for t in worst.text)


def test_report_command_writes_page_and_summary(workspace, tmp_path):
    out = tmp_path / "r" / "report.html"
    r = run("report", *all_inputs(workspace), "--out", out, "--peers", PEERS_FILE, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result == {"kind": "report", "html": str(out), "markdown": str(out.with_suffix(".md")), "figures": 3,
                      "runs": 3}
    md = out.with_suffix(".md").read_text()
    assert "| w4g32-gptq | gptq | w4g32 |" in md and "**code_add**" in md and "FAIL (2.0% budget)" in md
    page = out.read_text()
    assert page.count("<img ") == 3 and "&lt;of course&gt;" in page  # answers are escaped text
    r = run("report", workspace["tasks"], "--out", tmp_path / "x.html", "--worst", -1)
    assert r.exit_code == 2 and "--worst must be 0 or more" in r.stderr


def test_compare_keep_writes_compare_json_that_report_reads(workspace, tmp_path):
    keep = tmp_path / "kept"
    text = workspace["text"]
    r = run("compare", workspace["model_dir"], "--methods", "gptq", "--scheme", "w4g32", "--calib", text,
            "--samples", 4, "--seq-len", 32, "--source", text, "--tokens", 256, "--window", 64, "--quiet",
            "--keep", keep, "--json")
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)
    assert printed["kind"] == "compare" and json.loads((keep / "compare.json").read_text()) == printed
    collection = collect([keep])
    [quant] = collection.quantized()
    assert quant.folder == keep / "w4g32-gptq" and quant.fidelity.mean_kl == printed["rows"][0]["mean_kl"]
    out = tmp_path / "report.html"
    r = run("report", keep, "--out", out, "--baseline", workspace["model_dir"], "--source", text, "--quiet")
    assert r.exit_code == 0, r.output
    check_page_in_browser(out, tmp_path, figures=5)


# -- the page in headless Chromium ----------------------------------------------------------------


def test_full_report_renders_in_headless_chromium(full_report, tmp_path):
    files = write_report(full_report, tmp_path / "report.html")
    check_page_in_browser(files.html, tmp_path, figures=5)


def test_browser_check_catches_a_blank_figure(workspace, tmp_path):
    """The check itself can fail: a page whose figure is a blank image does not pass."""
    built = build_report(collect([workspace["rtn"]]))
    blank = bytes_io.BytesIO()
    mpimg.imsave(blank, np.ones((40, 60, 3)), format="png")
    built.sections[-1].plots[0].png = blank.getvalue()
    files = write_report(built, tmp_path / "blank.html")
    with pytest.raises(AssertionError, match="blank"):
        check_page_in_browser(files.html, tmp_path, figures=2)


CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const found = Array.from(document.images).map(img => {
    const r = img.getBoundingClientRect();
    return {alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
            left: r.left + window.scrollX, top: r.top + window.scrollY, w: r.width, h: r.height};
  });
  console.log("REPORT-CHECK " + JSON.stringify({images: found, height: document.documentElement.scrollHeight}));
});
</script>
"""


def chromium() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "headless_shell"):
        found = shutil.which(name)
        if found:
            return found
    pattern = os.path.expanduser("~/.cache/ms-playwright/chromium_headless_shell-*/*/headless_shell")
    playwright = sorted(glob.glob(pattern))
    return playwright[-1] if playwright else None


def browse(browser: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, page.as_uri()],
        capture_output=True, text=True, timeout=120)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def check_page_in_browser(page: Path, tmp_path: Path, figures: int) -> None:
    """Render ``page`` and check: no console messages, no network resource, every figure loaded,
    each embedded PNG and its area of the screenshot not blank."""
    html = page.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//""", html)
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == figures
    for alt, data in images:
        pixels = mpimg.imread(bytes_io.BytesIO(base64.b64decode(data)), format="png")[..., :3]
        assert_not_blank(pixels, f"embedded figure {alt!r}")
    browser = chromium()
    if browser is None:
        if os.environ.get("LOWBIT_REQUIRE_BROWSER") == "1":
            pytest.fail("LOWBIT_REQUIRE_BROWSER=1 but no headless Chromium was found (make install-browser)")
        pytest.skip("no headless Chromium (chromium-headless-shell, chromium, Playwright's); make install-browser")
    plain = browse(browser, page, tmp_path / "profile", "--dump-dom")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert console_lines(plain.stderr) == [], "console messages from the page"
    assert plain.stdout.count("<img ") == figures
    checked = page.with_name(page.stem + "-checked.html")
    checked.write_text(html.replace("</body>", CHECK_SCRIPT + "</body>"))
    width = 1400
    first = browse(browser, checked, tmp_path / "profile", f"--window-size={width},800", "--dump-dom")
    found = _check_result(first.stderr)
    height = int(found["height"]) + 20
    shot = tmp_path / (page.stem + ".png")
    second = browse(browser, checked, tmp_path / "profile", f"--window-size={width},{height}", f"--screenshot={shot}")
    assert second.returncode == 0 and shot.exists(), second.stderr[-2000:]
    messages = [line for line in console_lines(second.stderr) if "REPORT-CHECK" not in line]
    assert messages == [], messages
    found = _check_result(second.stderr)
    screenshot = mpimg.imread(shot)[..., :3]
    assert screenshot.shape[:2] == (height, width)
    assert len(found["images"]) == figures
    for img in found["images"]:
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, f"figure {img['alt']!r} did not load"
        assert img["w"] > 100 and img["h"] > 100, f"figure {img['alt']!r} is drawn {img['w']}x{img['h']} px"
        top, left = int(img["top"]), int(img["left"])
        area = screenshot[top: top + int(img["h"]), left: left + int(img["w"])]
        assert area.shape[0] > 100 and area.shape[1] > 100, f"figure {img['alt']!r} lies outside the screenshot"
        assert_not_blank(area, f"figure {img['alt']!r} in the screenshot")


def _check_result(stderr: str) -> dict:
    lines = [line for line in console_lines(stderr) if "REPORT-CHECK" in line]
    assert lines, "the page's load event never ran:\n" + stderr[-2000:]
    text = lines[-1].split("REPORT-CHECK ", 1)[1]
    return json.loads(text[: text.rindex("}") + 1])


def assert_not_blank(pixels: np.ndarray, what: str) -> None:
    """Not one colour, some ink on the white background, and some of it in colour: every figure
    draws its data in colour (axes, ticks and text are black or grey; one scatter point and its
    label are a few hundred coloured pixels)."""
    inked = (np.abs(pixels - 1.0).max(-1) > 0.1).mean()
    coloured = int((pixels.max(-1) - pixels.min(-1) > 0.2).sum())
    assert pixels.std() > 0.01 and inked > 0.003 and coloured >= 100, (
        f"{what} is blank (std {pixels.std():.4f}, inked {inked:.4f}, {coloured} coloured pixels)")
