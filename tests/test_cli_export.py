"""`lowbit export`, `lowbit quantize --format` and `lowbit eval` of exported checkpoints, on a tiny
model folder."""

import json

import gguf
import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.eval.metrics import compare_models
from lowbit.models.tiny import byte_tokenizer, tiny_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-export")
    model_dir = root / "tiny"
    tiny_model(seed=5).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text = root / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i * 3} times, "
                                "and the river runs past the mill to the sea." * 3 for i in range(30)))
    source = gguf.GGUFWriter(str(root / "tiny.gguf"), "llama")
    source.add_block_count(2)
    source.write_header_to_file()
    source.write_kv_data_to_file()
    source.write_tensors_to_file()
    source.close()
    return root, model_dir, text


def test_export_then_eval_scores_the_same_codes(workspace):
    root, model_dir, text = workspace
    q = root / "q"
    assert run("quantize", model_dir, "--out", q, "--scheme", "w4g32-asym", "--quiet").exit_code == 0
    ct = root / "ct"
    r = run("export", q, "--format", "compressed-tensors", "--out", ct, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["format"] == "compressed-tensors" and (ct / "lowbit_export.json").is_file()
    r = run("eval", q, ct, "--baseline", model_dir, "--source", text, "--tokens", 256, "--window", 64,
            "--json", "--quiet")  # one table, both holders of the same codes
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert [row["model"] for row in rows] == [str(model_dir), str(q), str(ct)]
    scores = rows[1:]
    # the same codes give the same numbers, whichever format holds them
    for key in ("perplexity", "mean_kl", "top1_agreement"):
        assert scores[0][key] == scores[1][key], key
    # a second export to the same place needs --overwrite, which replaces lowbit's own export
    assert "already exists" in run("export", q, "--format", "compressed-tensors", "--out", ct).output
    assert run("export", q, "--format", "compressed-tensors", "--out", ct, "--overwrite").exit_code == 0


def test_quantize_straight_to_gguf_and_eval_it(workspace):
    root, model_dir, text = workspace
    out = root / "tiny-q8.gguf"
    r = run("quantize", model_dir, "--out", root / "direct.gguf", "--scheme", "gguf:Q8_0", "--format", "gguf:Q8_0",
            "--quiet")
    assert r.exit_code == 0, r.output  # a Llama folder: lowbit writes the header itself
    assert gguf.GGUFReader(str(root / "direct.gguf")).fields["general.architecture"].contents() == "llama"
    q = root / "q8"
    assert run("quantize", model_dir, "--out", q, "--scheme", "gguf:Q8_0", "--quiet").exit_code == 0
    r = run("export", q, "--format", "gguf:Q8_0", "--out", out, "--source", root / "tiny.gguf", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["bits_per_weight"] == 8.5
    reader = gguf.GGUFReader(str(out))
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.")} >= {"Q8_0", "F32"}


def test_eval_of_an_export_matches_its_native_reader(workspace, tmp_path):
    """`lowbit eval` of a compressed-tensors folder gives the numbers of the model transformers
    itself loads from that folder (tests/test_export_compressed_tensors.py reads folders that
    compressed-tensors' own compressor wrote)."""
    root, model_dir, text = workspace
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from lowbit.data.calibration import evaluation_tokens

    q = root / "q4"
    assert run("quantize", model_dir, "--out", q, "--scheme", "w4g32", "--quiet").exit_code == 0
    ct = tmp_path / "ct"
    assert run("export", q, "--format", "compressed-tensors", "--out", ct, "--quiet").exit_code == 0
    native = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = evaluation_tokens(byte_tokenizer(), source=str(text), max_tokens=256)
    expected = compare_models(native, reference, ids, window=64, progress=False)
    r = run("eval", ct, "--baseline", model_dir, "--source", text, "--tokens", 256, "--window", 64,
            "--json", "--quiet")
    row = json.loads(r.stdout)["rows"][1]
    assert row["mean_kl"] == round(expected.mean_kl, 5)
    assert row["perplexity"] == round(expected.perplexity, 4)


def test_export_refusals_are_one_line(workspace):
    root, model_dir, text = workspace
    q = root / "q-nf4"
    assert run("quantize", model_dir, "--out", q, "--scheme", "nf4g32", "--quiet").exit_code == 0
    r = run("export", q, "--format", "compressed-tensors", "--out", root / "x")
    assert r.exit_code != 0 and "bitsandbytes" in r.output and len(r.output.strip().splitlines()) == 1
    r = run("export", q, "--format", "onnx", "--out", root / "x")
    assert r.exit_code != 0 and "unknown export format" in r.output
    assert not (root / "x").exists()


def test_export_a_float_model_as_gguf_f16(workspace):
    root, model_dir, text = workspace
    out = root / "float.gguf"
    r = run("export", model_dir, "--format", "gguf:F16", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["bits_per_weight"] == 16.0
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types == {"F16", "F32"}
    r = run("export", model_dir, "--format", "gguf:Q4_0", "--out", root / "q.gguf")
    assert r.exit_code != 0  # a float folder is not a lowbit folder: only float file types


def test_gguf_without_a_type_takes_the_folders_file_type(workspace):
    root, model_dir, text = workspace
    q = root / "q4km"
    assert run("quantize", model_dir, "--out", q, "--scheme", "gguf:Q4_K_M", "--quiet").exit_code == 0
    out = root / "q4km.gguf"
    r = run("export", q, "--format", "gguf", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["format"] == "gguf:Q4_K_M" and report["fallbacks"]  # tiny rows: every k-quant falls back
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
