"""``lowbit compare`` (each run in its own process) and ``lowbit models`` on a tiny model folder."""

import json
import re
import tempfile

import pytest
from typer.testing import CliRunner

from lowbit import compare as compare_module, io
from lowbit.cli import app
from lowbit.data.calibration import CalibrationSpec, evaluation_tokens
from lowbit.errors import LowbitError
from lowbit.eval.metrics import compare_models
from lowbit.models.bundled import BUNDLED
from lowbit.models.tiny import byte_tokenizer, tiny_model
from lowbit.recipe import Recipe

runner = CliRunner()

# A budget small enough for seconds: 4 x 32 calibration tokens, 256 evaluation tokens in
# windows of 64, i.e. 4 windows scoring 63 tokens each.
TOKENS, WINDOW, SCORED = 256, 64, 4 * 63


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model_dir = root / "tiny"
    model = tiny_model(seed=11)
    model.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text = root / "text.txt"
    text.write_text("\n\n".join(
        f"Paragraph {i}: the quick brown fox jumps over the lazy dog while counting {i * 7} "
        "sheep, and the river keeps running past the old mill toward the sea." * 3
        for i in range(40)
    ))
    shapes = [m.weight.shape for n, m in model.named_modules() if n.endswith("_proj")]
    return root, model_dir, text, shapes


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def budget(text):
    return ["--calib", text, "--samples", 4, "--seq-len", 32, "--source", text,
            "--tokens", TOKENS, "--window", WINDOW, "--quiet"]


def test_compare_json_rows_match_the_saved_models(workspace):
    root, model_dir, text, shapes = workspace
    keep = root / "kept"
    r = run("compare", model_dir, "--methods", "gptq", "--scheme", "w4g32", *budget(text),
            "--keep", keep, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["tokens_scored"] == SCORED and result["window"] == WINDOW
    assert result["calibration"] == CalibrationSpec(source=str(text), num_samples=4, seq_len=32).to_dict()
    assert result["outputs"] == str(keep)
    [row] = result["rows"]
    assert (row["scheme"], row["method"]) == ("w4g32", "gptq")

    out = keep / "w4g32-gptq"
    report = json.loads((out / "lowbit_report.json").read_text())
    assert report["recipe"] == Recipe(scheme="w4g32", method="gptq").to_dict()
    assert report["calibration"] == result["calibration"]
    assert row["peak_rss_mb"] == report["peak_rss_mb"] > 0  # measured in the run's own process
    assert row["seconds"] == pytest.approx(report["seconds"], abs=1e-3)
    assert row["output_error"] == compare_module.mean_output_error(report)
    weights = sum(r * c for r, c in shapes)  # int4 codes plus a float16 scale per 32 weights
    assert row["bits_per_weight"] == pytest.approx(4.5, rel=1e-12)
    assert row["quantized_mb"] == pytest.approx(weights * 4.5 / 8 / 1e6, rel=1e-12)

    # Scored again here from the kept folder, on the same windows: the same numbers.
    qmodel, _ = io.load(out, with_tokenizer=False)
    ids = evaluation_tokens(byte_tokenizer(), source=str(text), max_tokens=TOKENS)
    fidelity = compare_models(qmodel, tiny_model(seed=11), ids, window=WINDOW, progress=False)
    assert result["baseline_perplexity"] == pytest.approx(fidelity.reference_perplexity, rel=1e-9)
    assert row["perplexity"] == pytest.approx(fidelity.perplexity, rel=1e-9)
    assert row["ppl_change_pct"] == pytest.approx(fidelity.perplexity_change_pct, rel=1e-9)
    assert row["mean_kl"] == pytest.approx(fidelity.mean_kl, rel=1e-9) and row["mean_kl"] > 0
    assert row["p99_kl"] == pytest.approx(fidelity.p99_kl, rel=1e-9)
    assert row["top1_agreement"] == fidelity.top1_agreement


def test_compare_table(workspace, monkeypatch):
    root, model_dir, text, _ = workspace
    # Runs in this process, to spare process starts (the test above covers that path).
    monkeypatch.setattr(compare_module, "run_in_process", lambda fn, *args, label: fn(*args))
    r = run("compare", model_dir, "--methods", "rtn,gptq", "--scheme", "w4g32", *budget(text))
    assert r.exit_code == 0, r.output
    assert f"{SCORED} " in r.stdout and "calibration 4 x 32" in r.stdout
    header, rtn, gptq = [_cells(line) for line in r.stdout.splitlines() if "w4g32" in line
                             or "bits/weight" in line]
    assert header[:7] == ["scheme", "method", "bits/weight", "MB", "time s", "peak MB", "output error"]
    assert rtn[:3] == ["w4g32", "rtn", "4.500"] and gptq[:3] == ["w4g32", "gptq", "4.500"]
    assert 0 < float(gptq[6]) < float(rtn[6]) < 1  # relative output error on calibration inputs


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split("[│┃]", line)[1:-1]]


def test_a_failed_run_is_one_line_and_leaves_no_temporary_folder(workspace, tmp_path, monkeypatch):
    _, model_dir, text, _ = workspace
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # 4 windows of 100,000 tokens: more than the calibration text holds, found in the run
    r = run("compare", model_dir, "--methods", "gptq", "--scheme", "w4g32", *budget(text),
            "--seq-len", 100_000)
    assert r.exit_code == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: w4g32 gptq: ") and "seq_len" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_a_missing_calibration_text_fails_before_any_run(workspace, monkeypatch):
    root, model_dir, text, _ = workspace
    monkeypatch.setattr(compare_module, "run_in_process", None)  # never reached
    r = run("compare", model_dir, "--methods", "gptq", *budget(text), "--calib", root / "missing.txt")
    assert r.exit_code == 2 and "missing.txt does not exist" in r.stderr


@pytest.mark.parametrize("error", [KeyboardInterrupt, LowbitError])
def test_interrupt_or_error_removes_the_temporary_folder(workspace, tmp_path, monkeypatch, error):
    _, model_dir, text, _ = workspace
    calls = []

    def stopped(fn, model, recipe, calibration, out, progress, label):
        calls.append((recipe, out, label))
        raise error("stopped")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(compare_module, "run_in_process", stopped)
    with pytest.raises(error, match="stopped"):
        compare_module.compare_methods(
            str(model_dir), ["w4g32"], ["awq+gptq"], source=str(text), tokens=TOKENS, window=WINDOW,
            progress=False,
        )
    [(recipe, out, label)] = calls
    # a method with + goes through as one recipe, under the name the user wrote
    assert recipe == Recipe(scheme="w4g32", method="awq+gptq").to_dict() and label == "w4g32 awq+gptq"
    assert out.startswith(str(tmp_path)) and out.endswith("w4g32-awq+gptq")
    assert list(tmp_path.iterdir()) == []


def test_mean_output_error_reads_old_and_new_reports():
    assert compare_module.mean_output_error({"layers": [{"name": "a"}, {"name": "b"}]}) is None
    assert compare_module.mean_output_error({"layers": [{"output_error": None}]}) is None
    layers = [{"output_error": 0.1}, {"output_error": 0.3}, {"output_error": None}]
    assert compare_module.mean_output_error({"layers": layers}) == pytest.approx(0.2)


def test_models_lists_every_bundled_model_with_its_note():
    r = run("models")
    assert r.exit_code == 0, r.output
    words = " ".join(r.stdout.split())  # rich wraps long notes
    entries = [f"{name}: {' '.join(record.note.split())}" for name, record in BUNDLED.items()]
    assert words == " ".join(entries)
    assert "smollm2-135m: Its weights were dequantized from a GGUF Q4_1 file" in words
