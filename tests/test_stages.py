"""Schemes with activations, recipes as ordered stages, and the common per-layer output error."""

import json

import pytest
import torch

from lowbit import io
from lowbit.contents import inspect_folder
from lowbit.core.args import QuantArgs, parse_args
from lowbit.core.scheme import PRESETS, Scheme, parse_scheme
from lowbit.errors import ConfigError
from lowbit.methods import HessianStats, LinearStats, resolve_stages, stage_names
from lowbit.methods.awq import AWQClip, AWQScale
from lowbit.methods.base import relative_output_error
from lowbit.methods.gptq import GPTQ
from lowbit.models.tiny import tiny_model
from lowbit.nn import QuantizedLinear
from lowbit.nn.linear import ActivationQuantizationError, weights_only
from lowbit.quantize import quantize
from lowbit.recipe import Recipe


def _calibration(seed=0, samples=6, seq=32):
    return torch.randint(0, 259, (samples, seq), generator=torch.Generator().manual_seed(seed))


# -- schemes -------------------------------------------------------------------------------------


def test_presets_mean_what_compressed_tensors_means():
    w8a8 = parse_scheme("W8A8")
    assert (w8a8.weights.format, w8a8.weights.granularity) == ("int8", "channel")
    a = w8a8.input_activations
    assert (a.format, a.granularity, a.dynamic, a.symmetric) == ("int8", "token", True, True)
    assert parse_scheme("int8") == w8a8  # alias, any case
    fp8 = parse_scheme("fp8")
    assert (fp8.weights.format, fp8.weights.granularity) == ("fp8_e4m3", "tensor")
    assert (fp8.input_activations.granularity, fp8.input_activations.dynamic) == ("tensor", False)
    dyn = parse_scheme("FP8_DYNAMIC")
    assert (dyn.weights.granularity, dyn.input_activations.granularity, dyn.input_activations.dynamic) == (
        "channel", "token", True)
    assert parse_scheme("W4A16").weights == parse_args("w4g128")
    assert parse_scheme("w4a16_asym").weights == parse_args("w4g128-asym")
    assert parse_scheme("W8A16").weights == parse_args("w8g128")
    for name, scheme in PRESETS.items():
        assert Scheme.from_dict(json.loads(json.dumps(scheme.to_dict()))) == scheme, name


def test_short_weight_strings_are_weight_only_schemes():
    s = parse_scheme("w4g64-asym")
    assert s.weights == parse_args("w4g64-asym") and not s.quantizes_activations
    assert s.name() == "w4g64-asym"
    assert parse_scheme("W8A8").name() == "W8A8"


def test_scheme_errors_name_the_fix():
    with pytest.raises(ConfigError, match="unknown scheme 'w4x'.*W8A8"):
        parse_scheme("w4x")
    with pytest.raises(ConfigError, match="weights cannot be dynamic"):
        Scheme(QuantArgs("int8", granularity="token", group_size=None, dynamic=True))
    with pytest.raises(ConfigError, match="does not apply to activations"):
        Scheme(parse_args("w8"), parse_args("w8"))
    with pytest.raises(ConfigError, match="set dynamic=true"):
        Scheme(parse_args("w8"), QuantArgs("int8", granularity="token", group_size=None))
    with pytest.raises(ConfigError, match="unknown field"):
        Scheme.from_dict({"weights": {"format": "int4"}, "inputs": None})


# -- stages --------------------------------------------------------------------------------------


def test_method_strings_expand_to_ordered_stages():
    assert stage_names("awq") == ["awq_scale", "awq_clip"]
    assert stage_names("awq+gptq") == ["awq_scale", "gptq"]
    assert stage_names("AWQ + RTN") == ["awq_scale", "rtn"]
    assert stage_names("awq_scale+awq_clip") == ["awq_scale", "awq_clip"]
    for bad, match in [("gptq+awq_scale", "exactly one weight quantizer"), ("rtn+gptq", "exactly one"),
                       ("awq_scale", "exactly one"), ("awq+nope", "unknown method 'nope'"),
                       ("", "method must be")]:
        with pytest.raises(ConfigError, match=match):
            stage_names(bad)


def test_options_go_to_the_stages_that_have_them():
    scale, gptq = resolve_stages("awq+gptq", {"n_grid": 4, "act_order": False, "max_input_rows": 256})
    assert isinstance(scale, AWQScale) and isinstance(gptq, GPTQ)
    assert (scale.config.n_grid, scale.config.max_input_rows, gptq.config.act_order) == (4, 256, False)
    scale, clip = resolve_stages("awq", {"max_input_rows": 100, "awq_clip.clip_grid": 3})
    assert isinstance(clip, AWQClip)
    assert (scale.config.max_input_rows, clip.config.max_input_rows, clip.config.clip_grid) == (100, 100, 3)
    scale, clip = resolve_stages("awq", {"awq.max_input_rows": 64})  # the alias names both
    assert scale.config.max_input_rows == clip.config.max_input_rows == 64
    with pytest.raises(ConfigError, match="unknown option 'act_ordr'.*act_order"):
        resolve_stages("awq+gptq", {"act_ordr": False})
    with pytest.raises(ConfigError, match="'hqq' is not a stage"):
        resolve_stages("gptq", {"hqq.iters": 3})


def test_recipe_validates_everything_up_front_and_records_its_stages():
    with pytest.raises(ConfigError, match="unknown method"):
        Recipe(method="gptqq")
    with pytest.raises(ConfigError, match="unknown option"):
        Recipe(method="gptq", method_options={"dampning": 0.1})
    with pytest.raises(ConfigError, match="unknown observer"):
        Recipe(scheme="w4g128-msee")
    recipe = Recipe(scheme="W8A8", method="awq+gptq", method_options={"gptq.act_order": False})
    data = recipe.to_dict()
    assert [s["name"] for s in data["stages"]] == ["awq_scale", "gptq"]
    assert [s["kind"] for s in data["stages"]] == ["transform", "quantizer"]
    assert data["stages"][1]["options"]["act_order"] is False
    again = Recipe.from_dict(json.loads(json.dumps(data)))
    assert again == recipe
    with pytest.raises(ConfigError, match="do not match"):
        Recipe.from_dict({**data, "stages": [{"name": "gptq"}]})
    old = {"version": 1, "scheme": parse_args("w4g128").to_dict(), "method": "gptq", "method_options": {},
           "targets": ["re:.*"], "ignore": ["lm_head"], "overrides": []}
    assert Recipe.from_dict(old).scheme == parse_scheme("w4g128")


def test_awq_then_gptq_runs_and_is_deterministic():
    calib = _calibration()
    states, reports = [], []
    for _ in range(2):
        model = tiny_model(seed=3)
        reports.append(quantize(model, Recipe(scheme="w4g32", method="awq+gptq",
                                              method_options={"n_grid": 5}), calib, progress=False))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    report = reports[0]
    assert {r.objective for r in report.layers} == {"relative_output_error"}
    # AWQ's scales were folded: the norms changed, and GPTQ's error is on the scaled problem
    assert not torch.equal(states[0]["model.layers.0.input_layernorm.weight"],
                           tiny_model(seed=3).state_dict()["model.layers.0.input_layernorm.weight"])
    for r in report.layers:  # GPTQ's own objective is the common measure
        assert r.output_error == pytest.approx(r.objective_value, rel=1e-4)


# -- the common per-layer error ----------------------------------------------------------------


def test_relative_output_error_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 48, generator=g), torch.randn(300, 48, generator=g)
    q = resolve_stages("rtn")[0].quantize_weight(w, parse_args("w3g16"), None).qweight
    stats = HessianStats.empty(48)
    stats.add(x)
    expected = float((x @ w.T - x @ q.dequantize().T).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert relative_output_error(w, q.dequantize(), stats.hessian) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq", "awq", "awq+gptq"])
def test_every_method_reports_the_common_error(method):
    model = tiny_model(seed=2)
    report = quantize(model, Recipe(scheme="w3g32", method=method, method_options={}), _calibration(),
                      progress=False)
    assert len(report.layers) == 14
    for r in report.layers:
        assert r.output_error is not None and 0 < r.output_error < 1, r
        assert isinstance(r.objective, str) and r.objective_value >= 0
    assert report.mean_output_error == pytest.approx(sum(r.output_error for r in report.layers) / 14)
    assert report.to_dict()["layers"][0]["output_error"] == report.layers[0].output_error


def test_calibrated_methods_beat_rtn_on_the_common_error():
    errors = {}
    for method in ("rtn", "gptq", "awq"):
        errors[method] = quantize(tiny_model(seed=2), Recipe(scheme="w3g32", method=method),
                                  _calibration(samples=8), progress=False).mean_output_error
    assert errors["gptq"] < errors["rtn"] and errors["awq"] < errors["rtn"]


def test_data_free_methods_without_calibration_report_no_error():
    report = quantize(tiny_model(seed=2), Recipe(scheme="w4g32", method="hqq"), progress=False)
    assert all(r.output_error is None for r in report.layers)
    assert report.mean_output_error is None and report.to_dict()["mean_output_error"] is None


def test_transformed_statistics_give_the_original_layers_error():
    """After AWQ's fold, tr(D H D^T) on the scaled weight and divided Hessian equals the error of
    the dequantized scaled weight against the original layer on the original inputs."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(16, 32, generator=g), torch.randn(200, 32, generator=g)
    s = torch.rand(32, generator=g) + 0.5
    stats = LinearStats(hessian=HessianStats.empty(32))
    stats.add(x)
    stats.divide(s)
    q = resolve_stages("rtn")[0].quantize_weight(w * s, parse_args("w4g8"), None).qweight
    expected = float((x @ w.T - (x / s) @ q.dequantize().T).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert relative_output_error(w * s, q.dequantize(), stats["hessian"].hessian) == pytest.approx(expected, rel=1e-4)


# -- activation schemes: saved, loaded, shown; refused at run time -------------------------------


@pytest.mark.parametrize("preset", ["W8A8", "FP8", "FP8_DYNAMIC"])
def test_activation_schemes_round_trip_and_refuse_to_run(tmp_path, tokenizer, preset):
    model = tiny_model(seed=5)
    recipe = Recipe(scheme=preset, method="gptq")
    report = quantize(model, recipe, _calibration(), progress=False)  # propagation: weights only
    assert report.layers[0].scheme == preset
    out = io.save(model, tmp_path / "q", tokenizer=tokenizer, recipe=recipe, report=report.to_dict())
    again, _ = io.load(out)
    layer = again.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLinear)
    assert layer.input_activations == PRESETS[preset].input_activations
    ids = torch.randint(0, 259, (1, 8))
    with pytest.raises(ActivationQuantizationError, match="cannot run yet"):
        again(ids)
    assert torch.equal(_weights_only_logits(again, ids), _weights_only_logits(model, ids))
    info = inspect_folder(out)
    described = PRESETS[preset].input_activations.describe()
    assert info.layers[0].activations() == f"in: {described}"
    assert info.to_dict()["layers"][0]["activations"] == f"in: {described}"
    assert Recipe.from_dict(info.recipe).scheme == PRESETS[preset]


def _weights_only_logits(model, ids):
    with torch.no_grad(), weights_only(model):
        return model(ids).logits
