"""The command line on a tiny model folder: the happy path and one-line errors."""

import json

import pytest
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.models.tiny import byte_tokenizer, tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny"
    tiny_model(seed=11).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    paragraphs = [
        f"Paragraph {i}: the quick brown fox jumps over the lazy dog while counting {i * 7} "
        "sheep, and the river keeps running past the old mill toward the sea." * 3
        for i in range(40)
    ]
    text = root / "text.txt"
    text.write_text("\n\n".join(paragraphs))
    return root, model_dir, text


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_quantize_eval_inspect(workspace):
    root, model_dir, text = workspace
    out = root / "q"
    r = run("quantize", model_dir, "--out", out, "--scheme", "w4g32", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["layers"] == 14 and 4 < summary["bits_per_weight"] < 5

    r = run("eval", out, "--baseline", model_dir, "--source", text, "--tokens", 256,
            "--window", 64, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    base, quant = result["rows"]
    assert base["perplexity"] > 1 and quant["perplexity"] > 1
    assert quant["mean_kl"] > 0 and 0 < quant["top1_agreement"] <= 1
    assert quant["bits_per_weight"] == pytest.approx(summary["bits_per_weight"], abs=1e-3)
    assert quant["size_mb"] < base["size_mb"]

    r = run("eval", out, "--baseline", model_dir, "--source", text, "--tokens", 256, "--window", 64, "--quiet")
    assert r.exit_code == 0 and "mean KL" in r.stdout

    r = run("inspect", out, "--json")
    info = json.loads(r.stdout)
    assert len(info["layers"]) == 14 and info["layers"][0]["format"] == "int4"
    r = run("inspect", out)
    assert r.exit_code == 0 and "bits/weight" in r.stdout


def test_calibrated_method_from_a_text_file(workspace):
    root, model_dir, text = workspace
    out = root / "gptq"
    r = run("quantize", model_dir, "--out", out, "--scheme", "w4g32", "--method", "gptq",
            "--calib", text, "--samples", 4, "--seq-len", 32, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "lowbit_report.json").read_text())
    assert report["calibration"]["num_samples"] == 4
    assert report["recipe"]["method"] == "gptq"


@pytest.mark.parametrize(
    "args, message",
    [
        (["quantize", "/no/such/model", "--out", "{root}/x"], "not found"),
        (["quantize", "{model}", "--out", "{root}/x", "--scheme", "w9"], "unknown scheme"),
        (["quantize", "{model}", "--out", "{root}/x", "--method", "magic"], "unknown method"),
        (["quantize", "{model}", "--out", "{root}/x", "--option", "oops"], "key=value"),
        (["quantize", "{root}", "--out", "{root}/x"], "not a model"),
        (["inspect", "{model}"], "not a lowbit-quantized model"),
    ],
)
def test_user_errors_are_one_line(workspace, args, message):
    root, model_dir, _ = workspace
    args = [a.format(root=root, model=model_dir) for a in args]
    r = run(*args)
    assert r.exit_code == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (root / "x").exists()


def test_unsupported_architecture_names_the_fix(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(tmp_path / "gpt2")
    r = run("quantize", tmp_path / "gpt2", "--out", tmp_path / "x")
    assert r.exit_code == 2
    assert "gpt2" in r.stderr and "lowbit/models/arch.py" in r.stderr


def test_existing_output_is_refused(workspace):
    root, model_dir, _ = workspace
    (root / "exists").mkdir()
    r = run("quantize", model_dir, "--out", root / "exists")
    assert r.exit_code == 2 and "already exists" in r.stderr


def test_quantizing_a_quantized_folder_is_refused(workspace):
    root, model_dir, _ = workspace
    out = root / "twice"
    assert run("quantize", model_dir, "--out", out, "--quiet").exit_code == 0
    r = run("quantize", out, "--out", root / "thrice")
    assert r.exit_code == 2 and "already quantized (lowbit)" in r.stderr


def test_low_memory_is_opt_in(workspace, monkeypatch):
    import lowbit.memory

    calls = []
    monkeypatch.setattr(lowbit.memory, "serve_large_blocks_with_mmap", lambda: calls.append(1))
    root, model_dir, _ = workspace
    r = run("quantize", model_dir, "--out", root / "lm1", "--scheme", "w8", "--quiet")
    assert r.exit_code == 0 and calls == []
    r = run("quantize", model_dir, "--out", root / "lm2", "--scheme", "w8", "--quiet", "--low-memory")
    assert r.exit_code == 0 and calls == [1]
    report = json.loads((root / "lm2" / "lowbit_report.json").read_text())
    assert report["low_memory"] is True and report["peak_rss_mb"] > 0


def test_stages_activation_schemes_and_the_common_error_on_the_command_line(workspace):
    root, model_dir, text = workspace
    out = root / "ag"
    r = run("quantize", model_dir, "--out", out, "--scheme", "W8A8", "--method", "awq+gptq", "--calib", text,
            "--samples", 4, "--seq-len", 32, "--option", "n_grid=4", "--option", "gptq.act_order=false",
            "--quiet", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["method"] == "awq+gptq" and summary["scheme"] == "W8A8"
    assert 0 < summary["mean_output_error"] < 1
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    recipe = config["recipe"]
    assert [s["name"] for s in recipe["stages"]] == ["awq_scale", "gptq"]
    assert recipe["method_options"] == {"n_grid": 4, "gptq.act_order": False}  # typed, not "false"
    assert config["layers"]["model.layers.0.mlp.up_proj"]["input_activations"]["dynamic"] is True
    r = run("inspect", out)
    assert r.exit_code == 0 and "int8 token dynamic" in r.stdout and "awq_scale -> gptq" in r.stdout
    r = run("eval", out, "--baseline", model_dir, "--source", text, "--tokens", 128, "--window", 64, "--quiet")
    assert r.exit_code == 2 and "cannot run yet" in r.output


def test_data_free_methods_measure_the_output_error_only_with_calib(workspace):
    root, model_dir, text = workspace
    r = run("quantize", model_dir, "--out", root / "plain", "--scheme", "w4g32", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mean_output_error"] is None
    r = run("quantize", model_dir, "--out", root / "measured", "--scheme", "w4g32", "--calib", text,
            "--samples", 4, "--seq-len", 32, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert 0 < json.loads(r.stdout)["mean_output_error"] < 1


def test_a_recipe_file_alone_is_used(workspace, tmp_path):
    root, model_dir, _ = workspace
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"scheme": "w8", "method": "hqq", "method_options": {"iters": 3}}))
    r = run("quantize", model_dir, "--out", tmp_path / "q", "--recipe", recipe, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["scheme"] == "w8" and json.loads(r.stdout)["method"] == "hqq"
