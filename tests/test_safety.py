"""Issue 10: never destroy a user's files, never exit 0 with a non-finite model, one clear line
for every bad input. One test (or a few) per case of the issue, numbered as there; tiny models."""

import errno
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lowbit.quantize
from lowbit import io, outputs
from lowbit.cli import app
from lowbit.core.records import from_dict
from lowbit.errors import ConfigError, OutputError
from lowbit.models.tiny import byte_tokenizer, tiny_model
from lowbit.quantize import quantize
from lowbit.recipe import Recipe

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_error(r, *fragments) -> str:
    """The result is exit 2 with exactly one ``error:`` line holding every fragment."""
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def save_tiny(folder: Path, seed: int = 3, **overrides) -> Path:
    tiny_model(seed=seed, **overrides).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model = save_tiny(root / "tiny")
    text = root / "text.txt"
    text.write_text("\n\n".join(
        f"Paragraph {i}: the quick brown fox jumps over the lazy dog, counting {i * 7} sheep "
        "by the old mill on the river." * 2 for i in range(40)))
    calib = ["--calib", text, "--samples", 2, "--seq-len", 16, "--quiet"]
    q = root / "q"
    r = run("quantize", model, "--out", q, "--scheme", "w4g32", *calib)
    assert r.exit_code == 0, r.output
    evaluate = ["--source", text, "--tokens", 96, "--window", 32, "--quiet", "--json"]
    return SimpleNamespace(root=root, model=model, text=text, calib=calib, q=q, evaluate=evaluate)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(lowbit.quantize, "quantize_pretrained", refuse)


# -- 1. --overwrite never deletes what lowbit did not write ---------------------------------


def test_1_output_equal_to_inside_or_containing_the_input_is_refused(ws, tmp_path, no_loading):
    model = tmp_path / "work" / "m"
    model.parent.mkdir()
    save_tiny(model)
    before = snapshot(tmp_path)
    one_error(run("quantize", model, "--out", model, "--overwrite", *ws.calib), "is the model being read")
    one_error(run("quantize", model, "--out", model / "q", "--overwrite", *ws.calib), "lies inside")
    one_error(run("quantize", model, "--out", model.parent, "--overwrite", *ws.calib), "contains")
    (tmp_path / "link").symlink_to(model)
    one_error(run("quantize", model, "--out", tmp_path / "link", "--overwrite", *ws.calib), "being read")
    (tmp_path / "link").unlink()
    assert snapshot(tmp_path) == before


def test_1_overwrite_refuses_a_folder_lowbit_did_not_write(ws, tmp_path, no_loading):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    one_error(run("quantize", ws.model, "--out", precious, "--overwrite", *ws.calib),
              "not a lowbit output", "will not delete it")
    assert (precious / "thesis.txt").read_text() == "years of work"
    # The library refuses too, not only the command line.
    model = tiny_model(seed=4)
    quantize(model, Recipe(scheme="w8"), progress=False)
    with pytest.raises(OutputError, match="not a lowbit output"):
        io.save(model, precious, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]


def test_1_overwrite_refuses_a_lowbit_folder_holding_other_files(ws, tmp_path, no_loading):
    out = tmp_path / "q"
    out.mkdir()
    for f in ws.q.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "notes.txt").write_text("mine")
    one_error(run("quantize", ws.model, "--out", out, "--overwrite", *ws.calib),
              "entries lowbit did not write (notes.txt)")
    assert (out / "notes.txt").read_text() == "mine"


def test_1_overwrite_refuses_a_file(ws, tmp_path, no_loading):
    target = tmp_path / "afile.txt"
    target.write_text("keep me")
    one_error(run("quantize", ws.model, "--out", target, "--overwrite", *ws.calib), "is a file")
    assert target.read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == ["afile.txt"]


def test_1_overwrite_replaces_a_lowbit_output(ws, tmp_path):
    out = tmp_path / "q"
    assert run("quantize", ws.model, "--out", out, "--scheme", "w8", *ws.calib).exit_code == 0
    r = run("quantize", ws.model, "--out", out, "--scheme", "w4g32", "--overwrite", *ws.calib)
    assert r.exit_code == 0, r.output
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert {meta["format"] for meta in layers.values()} == {"int4"}
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary or old folder left


# -- 2. interrupted runs leave nothing behind -------------------------------------------------

_PAUSED_RUN = textwrap.dedent("""
    import pathlib, sys, time
    import lowbit.io, lowbit.models.load

    flag = pathlib.Path(sys.argv[1])

    def pause(folder):
        flag.write_text(str(folder))
        time.sleep(120)

    write = lowbit.io._write
    def slow_write(model, folder, *args):
        write(model, folder, *args)
        pause(folder)
    lowbit.io._write = slow_write

    def slow_convert(gguf, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"partial" * 1000)
        pause(out)
    lowbit.models.load.convert_gguf = slow_convert

    from lowbit.cli import main
    sys.argv = ["lowbit", *sys.argv[2:]]
    main()
""")


def _terminate_when_paused(tmp_path, *args, env=None):
    """Run ``lowbit ARGS`` in a child that pauses inside the write; SIGTERM it there."""
    flag = tmp_path / "paused"
    child = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_RUN, str(flag), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, cwd=REPO,
    )
    deadline = time.monotonic() + 120
    while not flag.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists(), child.communicate(timeout=30)
    partial = Path(flag.read_text())
    assert partial.exists()
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    return child.returncode, stderr, partial


def test_2_sigterm_while_saving_removes_the_temporary_folder(ws, tmp_path):
    out = tmp_path / "out" / "q"
    code, stderr, partial = _terminate_when_paused(
        tmp_path, "quantize", ws.model, "--out", out, "--scheme", "w8", *ws.calib)
    assert code == 143 and "terminated; no output was written" in stderr
    assert partial.name.startswith(".q.tmp-") and not partial.exists()
    assert list(out.parent.iterdir()) == []


def test_2_sigterm_during_gguf_conversion_cleans_the_model_cache(ws, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    cache = tmp_path / "cache"
    code, stderr, partial = _terminate_when_paused(
        tmp_path, "quantize", gguf, "--out", tmp_path / "q", *ws.calib, env={"LOWBIT_CACHE": str(cache)})
    assert code == 143, stderr
    assert cache in partial.parents and not partial.exists()
    assert list((cache / "models").iterdir()) == []
    assert not (tmp_path / "q").exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temp_of(pid: int, parent: Path, name: str, marked: bool = True) -> Path:
    made = outputs.temp_folder(parent, name, marked=marked)
    target = made.with_name(made.name.replace(f"-{os.getpid()}-", f"-{pid}-"))
    made.rename(target)
    (target / "model.safetensors").write_bytes(b"x" * 100)
    return target


def test_2_stale_temporary_folders_of_dead_processes_are_swept(tmp_path):
    dead = _dead_pid()
    stale = _temp_of(dead, tmp_path, "q")
    alive = _temp_of(os.getpid(), tmp_path, "q")  # a run still writing: left alone
    unmarked = _temp_of(dead, tmp_path, "q", marked=False)  # not recognisably lowbit's: kept
    model = tiny_model(seed=4)
    quantize(model, Recipe(scheme="w8"), progress=False)
    io.save(model, tmp_path / "q")
    assert not stale.exists() and alive.exists() and unmarked.exists()


def test_2_stale_conversion_folders_are_swept_from_the_cache(tmp_path, monkeypatch):
    from lowbit.models import load

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    cache = load.cache_root()
    cache.mkdir(parents=True)
    stale = _temp_of(_dead_pid(), cache, "tiny-0123")
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(load, "convert_gguf", lambda path, out: save_tiny(out))
    source = load.resolve_model(gguf)
    assert not stale.exists() and [p.name for p in cache.iterdir()] == [source.folder.name]


def test_2_renames_are_not_cut_in_two_by_a_signal():
    caught = []

    def handler(signum, frame):
        caught.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with outputs.signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                caught.append("block finished")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert caught == ["block finished", signal.SIGTERM]


# -- 3. the output is checked before the work, save-time failures are one line ---------------


def test_3_output_under_a_file_is_refused_before_loading(ws, tmp_path, no_loading):
    (tmp_path / "notamodel.txt").write_text("x")
    one_error(run("quantize", ws.model, "--out", tmp_path / "notamodel.txt" / "sub", *ws.calib),
              "notamodel.txt is a file")


def test_3_read_only_location_is_refused_before_loading(ws, tmp_path, monkeypatch, no_loading):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "mkdtemp", read_only)
    one_error(run("quantize", ws.model, "--out", tmp_path / "q", *ws.calib),
              "cannot write output", "Read-only file system")


def test_3_too_little_space_is_refused_before_loading(ws, tmp_path, monkeypatch, no_loading):
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    one_error(run("quantize", ws.model, "--out", tmp_path / "q", *ws.calib), "needs at least")


def test_3_full_disk_while_saving_is_one_line_and_leaves_nothing(ws, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "save_file", full)
    one_error(run("quantize", ws.model, "--out", tmp_path / "q", "--scheme", "w8", *ws.calib),
              "No space left on device")
    assert list(tmp_path.iterdir()) == []


# -- 4. non-finite values: eval fails loudly, readers refuse them -----------------------------


def _with_nan(src: Path, dst: Path, name: str, value=float("nan")) -> Path:
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors[name][0, 0] = value
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_4_eval_refuses_a_baseline_with_a_nan_weight(ws, tmp_path):
    bad = _with_nan(ws.model, tmp_path / "nan", "model.layers.1.mlp.down_proj.weight")
    one_error(run("eval", ws.q, "--baseline", bad, *ws.evaluate),
              "tensor model.layers.1.mlp.down_proj.weight holds 1 NaN/Inf")


def test_4_eval_refuses_a_quantized_model_with_nan_scales(ws, tmp_path, tokenizer):
    model = tiny_model(seed=3)
    quantize(model, Recipe(scheme="w4g32"), progress=False)
    model.model.layers[0].mlp.up_proj.qweight.scale[0, 0] = float("nan")
    out = io.save(model, tmp_path / "q", tokenizer=tokenizer)
    one_error(run("eval", out, "--baseline", ws.model, *ws.evaluate),
              "tensor model.layers.0.mlp.up_proj.scale holds 1 NaN/Inf")


def test_4_eval_fails_when_logits_are_not_finite(ws, tmp_path):
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.lm_head.weight.fill_(3e38)  # finite weights whose products overflow float32
    model.save_pretrained(tmp_path / "huge")
    byte_tokenizer().save_pretrained(tmp_path / "huge")
    one_error(run("eval", ws.q, "--baseline", tmp_path / "huge", *ws.evaluate),
              "the reference yields", "logits")


def _relabel(file: Path, name: str, dtype: str) -> None:
    """Rewrite one tensor's dtype in a safetensors header, keeping its length."""
    data = bytearray(file.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header[name]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    data[8:8 + n] = text
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("stored, relabelled", [("F32", "I32"), ("F16", "BF16")])
def test_4_a_header_that_relabels_a_dtype_is_refused(ws, tmp_path, stored, relabelled):
    model = tiny_model(seed=3).to(torch.float16 if stored == "F16" else torch.float32)
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    _relabel(tmp_path / "m" / "model.safetensors", "model.layers.0.mlp.up_proj.weight", relabelled)
    fragment = "model.layers.0.mlp.up_proj.weight is stored as I32" if relabelled == "I32" else "both as F16"
    one_error(run("eval", ws.q, "--baseline", tmp_path / "m", *ws.evaluate), fragment)
    one_error(run("quantize", tmp_path / "m", "--out", tmp_path / "q", *ws.calib), fragment)
    one_error(run("quantize", tmp_path / "m", "--out", tmp_path / "q", "--no-lazy", *ws.calib), fragment)


def test_4_a_relabelled_tensor_in_a_lowbit_checkpoint_is_refused(ws, tmp_path):
    import shutil

    out = tmp_path / "q"
    shutil.copytree(ws.q, out)
    _relabel(out / "model.safetensors", "model.layers.0.mlp.up_proj.qdata", "I8")
    one_error(run("eval", out, "--baseline", ws.model, *ws.evaluate), "SHA-256 differs")
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]["files"]  # as written by an older lowbit: no digests
    (out / "config.json").write_text(json.dumps(config))
    one_error(run("eval", out, "--baseline", ws.model, *ws.evaluate),
              "quantized layer model.layers.0.mlp.up_proj stores qdata as I8")


# -- 5. option values are parsed by their field's type ----------------------------------------


@pytest.mark.parametrize("text, value", [("False", False), ("no", False), ("0", False),
                                         ("TRUE", True), ("yes", True), ("1", True)])
def test_5_booleans_are_parsed_not_truthy(text, value):
    from lowbit.methods.hqq import HQQConfig

    assert from_dict(HQQConfig, {"optimize_scale": text}).optimize_scale is value


def test_5_numbers_tuples_and_optional_fields_are_parsed():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Options:
        steps: int = 1
        rate: float = 0.5
        skip: tuple[str, ...] = ()
        limit: int | None = None

    got = from_dict(Options, {"steps": "3", "rate": "2", "skip": "re:.*q_proj, lm_head", "limit": "none"})
    assert got == Options(3, 2.0, ("re:.*q_proj", "lm_head"), None)
    assert from_dict(Options, {"skip": '["a", "b"]', "limit": "7"}) == Options(skip=("a", "b"), limit=7)
    for field, text, expected in [("steps", "2.5", "an integer"), ("rate", "abc", "a number"),
                                  ("rate", "nan", "a number"), ("limit", "x", "an integer or none")]:
        with pytest.raises(ConfigError) as err:
            from_dict(Options, {field: text}, "demo options")
        message = str(err.value)
        assert f"demo options: {field} expects {expected}, got {text!r}" in message
        assert "allowed: steps, rate, skip, limit" in message and "\n" not in message


def test_5_cli_options_are_typed_and_checked_before_loading(ws, tmp_path, no_loading):
    one_error(run("quantize", ws.model, "--out", tmp_path / "h", "--method", "hqq",
                  "--option", "lp_norm=abc", *ws.calib), "lp_norm expects a number, got 'abc'")
    one_error(run("quantize", ws.model, "--out", tmp_path / "h", "--method", "hqq",
                  "--option", "optimize_scale=maybe", *ws.calib), "optimize_scale expects a boolean")
    one_error(run("quantize", ws.model, "--out", tmp_path / "h", "--method", "hqq",
                  "--option", "optimise_scale=1", *ws.calib), "unknown option 'optimise_scale'",
              "optimize_scale")


def test_5_false_switches_an_option_off(ws, tmp_path):
    out = tmp_path / "h"
    r = run("quantize", ws.model, "--out", out, "--method", "hqq", "--scheme", "w4g32",
            "--option", "optimize_scale=False", "--option", "iters=2", *ws.calib)
    assert r.exit_code == 0, r.output
    stages = json.loads((out / "config.json").read_text())["quantization_config"]["recipe"]["stages"]
    assert stages[0]["options"]["optimize_scale"] is False and stages[0]["options"]["iters"] == 2


# -- 6. --recipe is not silently combined; --ignore adds to lm_head ---------------------------


@pytest.mark.parametrize("extra", [["--scheme", "w8"], ["--method", "hqq"], ["--option", "iters=2"],
                                   ["--ignore", "re:.*down_proj"], ["--targets", "re:.*q_proj"]])
def test_6_recipe_with_recipe_options_is_refused(ws, tmp_path, extra, no_loading):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"scheme": "w4g32", "method": "rtn"}))
    one_error(run("quantize", ws.model, "--out", tmp_path / "q", "--recipe", recipe, *extra, *ws.calib),
              "--recipe holds", extra[0])


def test_6_ignore_adds_to_the_default(ws, tmp_path):
    out = tmp_path / "q"
    r = run("quantize", ws.model, "--out", out, "--scheme", "w4g32", "--ignore", "re:.*down_proj", *ws.calib)
    assert r.exit_code == 0, r.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["recipe"]["ignore"] == ["lm_head", "re:.*down_proj"]
    assert "lm_head" not in qc["layers"] and not any("down_proj" in n for n in qc["layers"])


# -- 7. an unrelated baseline is named as such --------------------------------------------------


def test_7_eval_warns_when_the_baseline_differs(ws, tmp_path):
    other = save_tiny(tmp_path / "other", seed=9, num_hidden_layers=1, intermediate_size=96)
    r = run("eval", ws.q, "--baseline", other, *ws.evaluate)
    assert r.exit_code == 0, r.output
    warning = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "num_hidden_layers 2 vs 1" in warning[0]
    assert "intermediate_size 160 vs 96" in warning[0]
    r = run("eval", ws.q, "--baseline", ws.model, *ws.evaluate)
    assert r.exit_code == 0 and "warning" not in r.stderr


# -- 8. a lowbit folder without its weights ---------------------------------------------------


@pytest.mark.parametrize("recorded", [True, False])
def test_8_missing_weights_are_one_line(ws, tmp_path, recorded):
    import shutil

    out = tmp_path / "q"
    shutil.copytree(ws.q, out)
    (out / "model.safetensors").unlink()
    if not recorded:
        config = json.loads((out / "config.json").read_text())
        del config["quantization_config"]["files"]
        (out / "config.json").write_text(json.dumps(config))
    fragment = "lacks model.safetensors" if recorded else "has no model.safetensors"
    one_error(run("inspect", out), fragment)
    one_error(run("eval", out, "--baseline", ws.model, *ws.evaluate), fragment)


# -- 9. broken inputs and impossible requests -------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_9_truncated_and_garbled_checkpoints(ws, tmp_path):
    truncated = _copy(ws.model, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    one_error(run("quantize", truncated, "--out", tmp_path / "x", *ws.calib), "is truncated")
    one_error(run("eval", ws.q, "--baseline", truncated, *ws.evaluate), "is truncated")
    garbled = _copy(ws.model, tmp_path / "garbled")
    data = bytearray((garbled / "model.safetensors").read_bytes())
    data[12:20] = b"\xff\x00" * 4
    (garbled / "model.safetensors").write_bytes(bytes(data))
    one_error(run("quantize", garbled, "--out", tmp_path / "x", *ws.calib), "header is not valid JSON")
    q = _copy(ws.q, tmp_path / "q")
    os.truncate(q / "model.safetensors", 1000)
    one_error(run("inspect", q), "has 1000 bytes")
    assert not (tmp_path / "x").exists()


def test_9_config_that_is_not_json(ws, tmp_path):
    model = _copy(ws.model, tmp_path / "m")
    (model / "config.json").write_text("{not json")
    one_error(run("quantize", model, "--out", tmp_path / "x", *ws.calib), "cannot read", "config.json")
    q = _copy(ws.q, tmp_path / "q")
    (q / "config.json").write_text("[1, 2")
    one_error(run("inspect", q), "cannot read", "config.json")
    one_error(run("eval", q, "--baseline", ws.model, *ws.evaluate), "config.json")


def test_9_lowbit_output_without_tokenizer(ws, tmp_path):
    q = _copy(ws.q, tmp_path / "q")
    for f in q.glob("tokenizer*"):
        f.unlink()
    one_error(run("eval", q, "--baseline", ws.model, *ws.evaluate), "has no tokenizer files")


@pytest.mark.parametrize("device, fragment", [("foo", "is not a device"), ("cuda:7", "cuda"),
                                              ("mps", "mps")])
def test_9_unusable_devices_are_refused_before_loading(ws, tmp_path, device, fragment, no_loading):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    one_error(run("quantize", ws.model, "--out", tmp_path / "x", "--device", device, *ws.calib), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--method", "magic"], "unknown method 'magic'"),
    (["--scheme", "w4g32-foo"], "unknown observer 'foo'"),
    (["--method", "gptq", "--option", "dampenin=0.1"], "unknown option 'dampenin'"),
    (["--calib", "no-such-file.txt"], "no-such-file.txt"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_9_the_whole_request_is_checked_before_loading(ws, tmp_path, args, fragment, no_loading):
    one_error(run("quantize", ws.model, "--out", tmp_path / "x", *ws.calib, *args), fragment)
    # A request that is wrong in two ways names the request, not the missing model.
    one_error(run("quantize", tmp_path / "missing", "--out", tmp_path / "x", *ws.calib, *args), fragment)


# -- 10. user text is never markup -----------------------------------------------------------


@pytest.mark.parametrize("name", ["model[/]", "my[bold]model", "[red]x[/red]"])
def test_10_user_text_is_printed_as_given(tmp_path, name):
    one_error(run("quantize", tmp_path / name, "--out", tmp_path / "x"), name)
    one_error(run("inspect", tmp_path / name), name)


def test_10_scheme_help_keeps_its_brackets(tmp_path):
    one_error(run("quantize", "m", "--out", tmp_path / "x", "--scheme", "w9"), "wBITS[gGROUP")
    r = runner.invoke(app, ["quantize", "--help"], terminal_width=400)
    assert r.exit_code == 0 and "wBITS[gGROUP][-asym][-OBSERVER]" in r.stdout


def test_10_tables_escape_names(ws, tmp_path):
    q = _copy(ws.q, tmp_path / "q[bold]")
    r = run("inspect", q)
    assert r.exit_code == 0 and "q[bold]" in r.stdout
