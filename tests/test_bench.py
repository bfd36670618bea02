"""Speed and memory measurement on a tiny model: structure, exact byte counts and ratios (no timings asserted)."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.errors import ConfigError
from lowbit.eval.bench import (
    BenchRow,
    BenchSettings,
    Speed,
    bench_models,
    measure,
    median_seconds,
    ratios,
    recorded_baseline,
    resident_mb,
    weight_bytes,
)
from lowbit.models.tiny import byte_tokenizer, tiny_model

SETTINGS = BenchSettings(prompt_tokens=8, decode_tokens=3, batch_sizes=(1, 2), repeats=1, threads=1, source="lee")


def load_tiny(spec: str):
    """"float": a tiny Llama; "w8": the same model, its linears RTN w8 per channel."""
    model = tiny_model(seed=0)
    if spec == "w8":
        from lowbit.quantize import quantize
        from lowbit.recipe import Recipe

        quantize(model, Recipe(scheme="w8"), progress=False)
    return model, byte_tokenizer()


def test_weight_bytes_counts_shared_tensors_once():
    model = tiny_model(seed=0, tie_word_embeddings=True)
    tensors = list(model.parameters()) + list(model.buffers())
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    assert weight_bytes(model) == sum(unique.values())
    assert weight_bytes(model) < sum(p.numel() * p.element_size() for p in model.state_dict().values())


def test_median_seconds_warms_up_then_repeats():
    calls = []
    assert median_seconds(lambda: calls.append(1), 3) >= 0
    assert len(calls) == 4


def test_resident_mb_is_positive():
    assert resident_mb() > 0


def test_measure_tiny_model_in_process():
    row = measure("w8", load_tiny, SETTINGS)
    model, _ = load_tiny("w8")
    assert row.model == "w8" and not row.baseline
    assert row.weight_mb == weight_bytes(model) / 1e6
    assert row.kernels == {"dequant": 14}
    assert row.load_seconds > 0 and math.isfinite(row.rss_mb) and row.peak_rss_mb > 0
    assert [s.batch for s in row.speeds] == [1, 2]
    for s in row.speeds:
        for value in (s.prefill_tokens_per_s, s.decode_tokens_per_s, s.ttft_seconds):
            assert value > 0 and math.isfinite(value)
    assert torch.get_num_threads() == 1
    same = ratios(row, row)
    assert set(same) == {"load_seconds", "rss_mb", "weight_mb", "peak_rss_mb", "prefill_b1", "decode_b1",
                         "ttft_b1", "prefill_b2", "decode_b2", "ttft_b2"}
    assert all(v == 1.0 for k, v in same.items() if k != "rss_mb")  # rss_mb may be 0: NaN then


def test_ratios_are_model_over_baseline():
    base = BenchRow("f", True, 2.0, 100.0, 40.0, 300.0, [Speed(1, 50.0, 10.0, 0.2)])
    row = BenchRow("q", False, 1.0, 25.0, 10.0, 150.0, [Speed(1, 25.0, 20.0, 0.4)])
    assert ratios(row, base) == {"load_seconds": 0.5, "rss_mb": 0.25, "weight_mb": 0.25, "peak_rss_mb": 0.5,
                                 "prefill_b1": 0.5, "decode_b1": 2.0, "ttft_b1": 2.0}
    zero = BenchRow("f", True, 2.0, 0.0, 40.0, 300.0, [Speed(1, 50.0, 10.0, 0.2)])
    assert math.isnan(ratios(row, zero)["rss_mb"])


def test_bench_models_baseline_first_with_ratios():
    rows, used = bench_models(["w8", "float"], "float", load_tiny, SETTINGS, isolate=False, progress=False)
    assert [(r.model, r.baseline) for r in rows] == [("float", True), ("w8", False)]
    assert used.threads == 1
    assert all(v == 1.0 for k, v in rows[0].ratios.items() if k != "rss_mb")
    assert rows[1].kernels and not rows[0].kernels
    # w8 codes take a byte where float takes four (embeddings and lm_head stay float)
    assert rows[1].ratios["weight_mb"] == pytest.approx(rows[1].weight_mb / rows[0].weight_mb)
    assert rows[1].ratios["weight_mb"] < 0.9
    as_json = json.loads(json.dumps(rows[1].to_dict()))
    assert as_json["speeds"][1]["batch"] == 2 and "decode_b2" in as_json["ratios"]


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="decode_tokens"):
        BenchSettings(decode_tokens=1)
    with pytest.raises(ConfigError, match="batch sizes"):
        BenchSettings(batch_sizes=(1, 0))
    assert BenchSettings(threads=None).resolved().threads == torch.get_num_threads()
    assert BenchSettings(batch_sizes=[1, 8]).to_dict()["batch_sizes"] == [1, 8]


def test_recorded_baseline(tmp_path):
    assert recorded_baseline(str(tmp_path)) is None
    (tmp_path / "lowbit_report.json").write_text(json.dumps({"model": "SmolLM2", "model_spec": "smollm2-135m"}))
    assert recorded_baseline(str(tmp_path)) == "smollm2-135m"
    (tmp_path / "lowbit_report.json").write_text("not json")
    assert recorded_baseline(str(tmp_path)) is None


def test_cli_bench_needs_a_baseline(tmp_path):
    r = CliRunner().invoke(app, ["bench", str(tmp_path), "--quiet"])
    assert r.exit_code == 2 and "--baseline" in r.output
    r = CliRunner().invoke(app, ["bench", str(tmp_path), "--baseline", "x", "--batch-sizes", "1,a"])
    assert r.exit_code == 2 and "--batch-sizes" in r.output
    r = CliRunner().invoke(app, ["bench", str(tmp_path), "--baseline", "x", "--kernel", "nope"])
    assert r.exit_code == 2 and "nope" in r.output


def test_import_model_code_imports_the_architecture(tmp_path):
    import sys

    from lowbit.eval.bench import import_model_code

    module = "transformers.models.starcoder2.modeling_starcoder2"  # an architecture no other test builds
    if module in sys.modules:
        pytest.skip(f"{module} was imported before this test")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "starcoder2"}))
    import_model_code(str(tmp_path))
    assert module in sys.modules
    import_model_code(str(tmp_path / "missing"))  # nothing to import: the loader will report it
