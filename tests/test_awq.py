"""AWQ: scale search, folding, clipping, and the whole layer against RTN on identical inputs."""

import copy
import logging

import pytest
import torch
from torch import nn

from lowbit.core.args import parse_args
from lowbit.core.quantize import block_range, fake_quantize
from lowbit.errors import ConfigError
from lowbit.methods import InputStats, LinearStats, Target, resolve_stages
from lowbit.methods.awq import search_clip, search_scales
from lowbit.methods.rtn import RTN
from lowbit.models.arch import architecture_for
from lowbit.pipeline.layerwise import Plan, transform

ARCH = architecture_for("llama")
OUTLIERS = [3, 17, 42]  # input channels of the decoder layer that get large magnitudes
SMALL_GRIDS = {"n_grid": 5, "clip_grid": 5}  # where grid size does not matter: faster


def awq_layer(layer, targets, stats, options=None, skipped=None):
    """The pipeline's transform and quantize steps for ``awq`` on one decoder layer."""
    plan = Plan.from_stages(resolve_stages("awq", options), measure_error=False)
    transform(layer, targets, stats, plan, ARCH, set() if skipped is None else skipped)
    return {t.local_name: plan.quantizer.quantize_target(t, stats[t.local_name]) for t in targets}


def hidden_states(seed: int, outliers: bool = True, batch: int = 4, seq: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, 64, generator=gen)
    if outliers:
        h[..., OUTLIERS] *= 25.0
    return h


def run_layer(model, layer, hidden):
    positions = torch.arange(hidden.shape[1])[None]
    with torch.no_grad():
        return layer(hidden, position_embeddings=model.model.rotary_emb(hidden, positions))


def layer_targets(layer, args, index=0):
    return [
        Target(f"model.layers.{index}.{name}", name, m, args)
        for name, m in layer.named_modules()
        if isinstance(m, nn.Linear)
    ]


def capture_stats(model, layer, targets, hidden) -> dict[str, LinearStats]:
    """Input statistics per target from forward hooks; the balance linears of a mapping share one."""
    leader = {}
    for mapping in ARCH.mappings:
        for name in mapping.balance:
            leader.setdefault(name, mapping.balance[0])
    shared: dict[str, LinearStats] = {}
    stats = {
        t.local_name: shared.setdefault(leader.get(t.local_name, t.local_name),
                                        LinearStats(inputs=InputStats(10**6)))
        for t in targets
    }
    handles = [
        t.module.register_forward_hook(lambda m, inp, out, s=stats[t.local_name]: s.add(inp[0]))
        for t in targets
        if leader.get(t.local_name, t.local_name) == t.local_name
    ]
    try:
        run_layer(model, layer, hidden)
    finally:
        for h in handles:
            h.remove()
    return stats


def quantize_awq(model, scheme, config=None, outliers=True, index=0):
    """A copy of decoder layer ``index`` after AWQ, its results and stats."""
    layer = copy.deepcopy(model.model.layers[index])
    targets = layer_targets(layer, parse_args(scheme), index)
    stats = capture_stats(model, layer, targets, hidden_states(1, outliers))
    results = awq_layer(layer, targets, stats, config)
    return layer, targets, stats, results


def with_weights(layer, targets, weights):
    """A copy of ``layer`` whose target linears hold ``weights`` (by local name)."""
    layer = copy.deepcopy(layer)
    for t in targets:
        layer.get_submodule(t.local_name).weight.data.copy_(weights[t.local_name])
    return layer


def output_mse(model, layer, reference, hidden) -> float:
    return float((run_layer(model, layer, hidden) - run_layer(model, reference, hidden)).pow(2).mean())


# -- scale search ------------------------------------------------------------------------------


def test_alpha_zero_without_duo_scaling_is_rtn_bit_for_bit(tiny_llama):
    original = copy.deepcopy(tiny_llama.model.layers[0])
    config = {"n_grid": 1, "duo_scaling": False, "clip": False}
    layer, targets, _, results = quantize_awq(tiny_llama, "w4g32", config)
    rtn = RTN()
    for t in targets:
        w = original.get_submodule(t.local_name).weight.data
        expected = rtn.quantize_weight(w, t.args).qweight
        got = results[t.local_name].qweight
        assert torch.equal(got.qdata, expected.qdata) and torch.equal(got.scale, expected.scale)
    for (name, a), (_, b) in zip(original.state_dict().items(), layer.state_dict().items()):
        assert torch.equal(a, b), name


def qkv_problem(model, scheme, outliers):
    layer = model.model.layers[0]
    targets = layer_targets(layer, parse_args(scheme))
    stats = capture_stats(model, layer, targets, hidden_states(1, outliers))
    x = stats["self_attn.q_proj"]["inputs"]
    weights = [(layer.get_submodule(n).weight.data, t.args) for t in targets
               for n in [t.local_name] if n in ARCH.mappings[0].balance]
    return x.inputs, x.abs_mean, weights


def loss_by_hand(x, weights, s):
    return sum(
        float(((x / s) @ fake_quantize(w * s, args).t() - x @ w.t()).pow(2).sum())
        for w, args in weights
    )


@pytest.mark.parametrize("duo_scaling", [True, False])
def test_searched_scales_beat_identity_with_outliers(tiny_llama, duo_scaling):
    x, x_mean, weights = qkv_problem(tiny_llama, "w4g32", outliers=True)
    found = search_scales(x, x_mean, weights, duo_scaling=duo_scaling)
    identity = loss_by_hand(x, weights, torch.ones(64))
    assert found.identity_loss == pytest.approx(identity, rel=1e-5)
    assert found.alpha is not None
    assert found.loss == pytest.approx(loss_by_hand(x, weights, found.scales), rel=1e-5)
    assert found.loss < 0.9 * identity
    # the protected channels are the salient ones
    others = [c for c in range(64) if c not in OUTLIERS]
    assert found.scales[OUTLIERS].min() > found.scales[others].max()


def test_searched_scales_never_worse_than_identity(tiny_llama):
    x, x_mean, weights = qkv_problem(tiny_llama, "w3g32", outliers=False)
    for duo_scaling in (True, False):
        found = search_scales(x, x_mean, weights, n_grid=5, duo_scaling=duo_scaling)
        assert found.loss <= loss_by_hand(x, weights, torch.ones(64)) * (1 + 1e-6)


def test_scaling_keeps_the_float_layer_function_and_updates_stats(tiny_llama):
    original = copy.deepcopy(tiny_llama.model.layers[0])
    layer, targets, stats, _ = quantize_awq(tiny_llama, "w4g32", {"clip": False})
    # scales were folded (so this test can fail) ...
    assert not torch.equal(layer.input_layernorm.weight, original.input_layernorm.weight)
    assert not torch.equal(layer.mlp.down_proj.weight, original.mlp.down_proj.weight)
    # ... and the float layer (weights not replaced by their quantized values) is unchanged
    held_out = hidden_states(2)
    out, ref = run_layer(tiny_llama, layer, held_out), run_layer(tiny_llama, original, held_out)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # the stats now describe what the scaled linears receive
    again = capture_stats(tiny_llama, layer, targets, hidden_states(1))
    for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj", "self_attn.o_proj"):
        torch.testing.assert_close(stats[name]["inputs"].inputs, again[name]["inputs"].inputs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats[name]["inputs"].abs_mean, again[name]["inputs"].abs_mean, rtol=1e-4, atol=1e-5)


# -- clipping ----------------------------------------------------------------------------------


def block_errors_by_loop(w, x, args, lo, hi):
    """|| (Q(W) - W)_block X_block^T ||^2 for every block, one block at a time."""
    rows, cols = args.block_size(w.shape)
    d = fake_quantize(w, args, lo, hi) - w
    err = torch.empty_like(lo)
    for i in range(lo.shape[0]):
        for j in range(lo.shape[1]):
            r, c = slice(i * rows, (i + 1) * rows), slice(j * cols, (j + 1) * cols)
            err[i, j] = (x[:, c] @ d[r, c].t()).pow(2).sum()
    return err


@pytest.mark.parametrize("scheme", ["w3g16", "w4g16-asym", "w3", "w4b2x16"])
def test_clip_search_finds_the_best_ratio_of_each_block(scheme):
    args = parse_args(scheme)
    w = torch.randn(7, 40)  # 40 columns in groups of 16: a ragged last group; 7 rows in 2-row blocks
    x = torch.randn(50, 40)
    x[:, 5] *= 10
    lo, hi = block_range(w, args)
    ratios = torch.linspace(1.0, 0.5, 8).tolist()
    best = torch.stack([block_errors_by_loop(w, x, args, lo * r, hi * r) for r in ratios]).amin(0)
    xmin, xmax = search_clip(w, x, args, n_ratios=8)
    torch.testing.assert_close(block_errors_by_loop(w, x, args, xmin, xmax), best, rtol=1e-5, atol=0)
    rtn = block_errors_by_loop(w, x, args, lo, hi)
    assert (best < rtn).any() and (best <= rtn).all()


def test_clip_skips_q_and_k_by_default(tiny_llama):
    layer, targets, _, results = quantize_awq(tiny_llama, "w3g32", SMALL_GRIDS)
    for t in targets:
        rtn = RTN().quantize_weight(t.module.weight.data, t.args).qweight  # on the scaled weight
        same = torch.equal(results[t.local_name].qweight.qdata, rtn.qdata)
        assert same == (t.local_name in ("self_attn.q_proj", "self_attn.k_proj")), t.local_name


# -- the whole layer ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["w4g32", "w3g32", "w4g32-asym"])
def test_awq_beats_rtn_on_held_out_inputs(tiny_llama, scheme):
    original = tiny_llama.model.layers[0]
    layer, targets, _, results = quantize_awq(tiny_llama, scheme)
    awq = with_weights(layer, targets, {k: r.qweight.dequantize() for k, r in results.items()})
    rtn = with_weights(original, targets, {
        t.local_name: RTN().quantize_weight(original.get_submodule(t.local_name).weight.data, t.args)
        .qweight.dequantize() for t in targets
    })
    held_out = hidden_states(2)
    awq_err = output_mse(tiny_llama, awq, original, held_out)
    rtn_err = output_mse(tiny_llama, rtn, original, held_out)
    assert awq_err < 0.8 * rtn_err


def test_gqa_value_mapping_is_skipped_and_logged_once(tiny_llama, caplog):
    caplog.set_level(logging.INFO, logger="lowbit.pipeline.layerwise")
    skipped = set()
    for index in (0, 1):
        layer = tiny_llama.model.layers[index]
        o_proj = layer.self_attn.o_proj.weight.clone()
        targets = layer_targets(layer, parse_args("w4g32"), index)
        stats = capture_stats(tiny_llama, layer, targets, hidden_states(index))
        results = awq_layer(layer, targets, stats, SMALL_GRIDS, skipped)
        assert set(results) == {t.local_name for t in targets}
        assert torch.equal(layer.self_attn.o_proj.weight, o_proj)  # not a balance of any fold
    skipped = [r for r in caplog.records if "v_proj -> self_attn.o_proj" in r.getMessage()]
    assert len(skipped) == 1
    assert "produces 32 channels" in skipped[0].getMessage()


def test_deterministic(tiny_llama):
    runs = [quantize_awq(tiny_llama, "w4g32-asym", SMALL_GRIDS)[3] for _ in range(2)]
    for name, a in runs[0].items():
        b = runs[1][name]
        assert torch.equal(a.qweight.qdata, b.qweight.qdata)
        assert torch.equal(a.qweight.scale, b.qweight.scale)
        assert torch.equal(a.qweight.zero_point, b.qweight.zero_point)
        assert a.objective == b.objective


def test_config_is_validated():
    clip = resolve_stages("awq", {"clip_skip": ["re:.*o_proj"]})[1]
    assert clip.config.skips_clip("model.layers.0.self_attn.o_proj")
    for bad in ({"n_grid": 0}, {"min_clip_ratio": 0.0}, {"clip_skip": ["re:("]}, {"ngrid": 20}):
        with pytest.raises(ConfigError):
            resolve_stages("awq", bad)
