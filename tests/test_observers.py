"""Observers: registry and errors, streaming invariants, primitives against slow references,
and each algorithm against the min-max baseline on identical heavy-tailed data."""

import math

import pytest
import torch

from lowbit.core.args import QuantArgs, parse_args
from lowbit.core.quantize import fake_quantize, quantize
from lowbit.errors import ConfigError
from lowbit.methods import get_method
from lowbit.observers import OBSERVERS, BlockHistogram, get_observer
from lowbit.observers.kl import kl_divergences
from lowbit.observers.percentile import exact_quantiles

NAMES = ("minmax", "moving_average", "percentile", "mse", "kl")


def student_t(shape, df: float, seed: int) -> torch.Tensor:
    """Student-t samples: z / sqrt(chi2_df / df), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((int(df), *shape), generator=g).pow(2).sum(0)
    return z / (chi2 / df).sqrt()


def stream(name, args, batches, **options):
    observer = get_observer(name, args, **options)
    for b in batches:
        observer.update(b)
    return observer


def squared_error(x, args, lo, hi, where=None):
    err = (fake_quantize(x, args, lo, hi) - x).pow(2)
    return float(err.mean() if where is None else err[where].mean())


def central(x: torch.Tensor, share: float = 0.99) -> torch.Tensor:
    """Mask of the central ``share`` of ``x``'s values (the bulk)."""
    tail = (1 - share) / 2
    lo, hi = torch.quantile(x.flatten(), torch.tensor([tail, 1 - tail]))
    return (x >= lo) & (x <= hi)


# -- registry and errors ----------------------------------------------------------------------


def test_registry_has_every_observer():
    assert set(NAMES) <= set(OBSERVERS)


def test_unknown_observer_lists_known_names():
    with pytest.raises(ConfigError, match="unknown observer .*available: .*minmax.*percentile"):
        get_observer("minmaxx", QuantArgs())


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="allowed: momentum"):
        get_observer("moving_average", QuantArgs(), momentun=0.5)


@pytest.mark.parametrize("name, options", [
    ("moving_average", {"momentum": 1.0}),
    ("percentile", {"percentile": 40.0}),
    ("percentile", {"bins": 2047}),
    ("mse", {"steps": 0}),
    ("mse", {"min_ratio": 0.0}),
    ("kl", {"bins": 64}),  # fewer bins than int8's 128 positive levels
])
def test_invalid_option_values(name, options):
    with pytest.raises(ConfigError):
        get_observer(name, parse_args("w8-tensor"), **options)


def test_options_are_declared_once_in_the_signature():
    assert OBSERVERS["moving_average"].options() == {"momentum": 0.9}
    assert OBSERVERS["percentile"].options() == {"percentile": 99.99, "bins": 2048}
    assert OBSERVERS["mse"].options() == {"steps": 100, "min_ratio": 0.2, "bins": 2048}
    assert OBSERVERS["kl"].options() == {"bins": 2048}


@pytest.mark.parametrize("name", NAMES)
def test_range_before_any_data_is_a_config_error(name):
    with pytest.raises(ConfigError, match="no data"):
        get_observer(name, parse_args("w8-tensor")).range()


@pytest.mark.parametrize("name", NAMES)
def test_grid_change_is_a_config_error(name):
    observer = get_observer(name, parse_args("w8"))  # per-channel: one block per row
    observer.update(torch.randn(4, 64))
    with pytest.raises(ConfigError, match="grid changed"):
        observer.update(torch.randn(5, 64))


@pytest.mark.parametrize("name", NAMES)
def test_per_tensor_streams_accept_any_batch_size(name):
    args = parse_args("w8-tensor")
    observer = stream(name, args, [torch.randn(n, 32) for n in (3, 17, 8)])
    lo, hi = observer.range()
    assert lo.shape == hi.shape == (1, 1)
    quantize(torch.randn(5, 32), args, lo, hi)  # the range plugs into quantize


def test_kl_rejects_groups_and_non_integer_formats():
    with pytest.raises(ConfigError, match="tensor, channel, token"):
        get_observer("kl", parse_args("w4g128"))
    with pytest.raises(ConfigError, match="integer format"):
        get_observer("kl", parse_args("nf4g64").with_(granularity="tensor", group_size=None))


# -- streaming invariants -----------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["w8-tensor", "w4g16-asym"])
def test_minmax_ten_batches_equal_one(scheme):
    args = parse_args(scheme)
    batches = [student_t((8, 40), 2, seed) for seed in range(10)]
    if args.granularity == "tensor":
        whole = torch.cat(batches)
    else:  # a fixed grid: the same positions in every batch; the whole is their elementwise extremes
        whole = torch.stack(batches)
    ten = stream("minmax", args, batches).range()
    if args.granularity == "tensor":
        one = stream("minmax", args, [whole]).range()
    else:
        one = (
            torch.stack([stream("minmax", args, [b]).range()[0] for b in batches]).amin(0),
            torch.stack([stream("minmax", args, [b]).range()[1] for b in batches]).amax(0),
        )
    assert torch.equal(ten[0], one[0]) and torch.equal(ten[1], one[1])


@pytest.mark.parametrize("name", NAMES)
def test_state_does_not_grow_with_batches(name):
    args = parse_args("w8-tensor")

    def state_size(updates):
        observer = stream(name, args, [torch.randn(64, 128) for _ in range(updates)])
        return sum(t.numel() for t in observer.state_tensors())

    one, two, fifty = state_size(1), state_size(2), state_size(50)
    assert fifty == two
    assert fifty <= one  # a kept first batch (8192 values) is larger than a 2048-bin histogram


def test_moving_average_follows_its_formula():
    args = parse_args("w8-tensor")
    batches = [torch.randn(16, 32) * (1 + i) for i in range(6)]
    observer = stream("moving_average", args, batches, momentum=0.8)
    lo, hi = batches[0].min(), batches[0].max()
    for b in batches[1:]:
        lo = 0.8 * lo + 0.2 * b.min()
        hi = 0.8 * hi + 0.2 * b.max()
    got_lo, got_hi = observer.range()
    torch.testing.assert_close(got_lo.squeeze(), lo)
    torch.testing.assert_close(got_hi.squeeze(), hi)
    assert got_hi.item() < max(b.max() for b in batches)  # it forgets the largest batch


@pytest.mark.parametrize("name", ["percentile", "mse", "kl"])
def test_streams_are_deterministic(name):
    args = parse_args("w4-tensor")
    batches = [student_t((32, 64), 2, seed) for seed in range(5)]
    a, b = stream(name, args, batches).range(), stream(name, args, batches).range()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- primitives against slow references ---------------------------------------------------------


def test_exact_quantiles_match_torch_quantile_on_real_elements():
    values = torch.randn(5, 40)
    mask = torch.ones(5, 40, dtype=torch.bool)
    mask[3, 25:] = False  # a ragged block: the tail is padding
    values[3, 25:] = 1e6  # which must be ignored
    qs = [0.0, 0.013, 0.5, 0.9999, 1.0]
    got = exact_quantiles(values, mask, qs)
    for row in range(5):
        real = values[row][mask[row]]
        want = torch.quantile(real, torch.tensor(qs))
        torch.testing.assert_close(torch.stack([g[row] for g in got]), want)


def test_histogram_rebinning_equals_binning_once_at_the_final_radius():
    batches = [torch.randn(3, 500) * scale for scale in (0.01, 1.0, 0.5, 37.0)]
    for signed in (True, False):
        grown = BlockHistogram.empty(3, 64, signed)
        for b in batches:
            grown.add(b if signed else b.abs())
        once = BlockHistogram(torch.zeros(3, 64, dtype=torch.int64), grown.radius.clone(), signed)
        whole = torch.cat(batches, -1)
        once.add(whole if signed else whole.abs())
        assert torch.equal(once.radius, grown.radius)  # no growth at the final radius
        assert int(grown.counts.sum()) == whole.numel()
        # Bin edges of the final grid are edges of every earlier grid: the same counts, up to
        # values that float rounding puts on the other side of an edge.
        assert int((once.counts - grown.counts).abs().sum()) <= 4


def reference_kl(h: list[float], levels: int, i: int) -> float:
    """Entropy calibration for one candidate, built literally as on the TensorRT slide."""
    p = h[:i]
    p[-1] += sum(h[i:])
    width = i // levels
    q = [0.0] * i
    for j in range(levels):
        start, stop = j * width, (i if j == levels - 1 else (j + 1) * width)
        bins = [k for k in range(start, stop) if p[k] != 0]
        for k in bins:
            q[k] = sum(h[start:stop]) / len(bins)
    sp, sq = sum(p), sum(q)
    out = 0.0
    for pk, qk in zip(p, q):
        if pk > 0:
            if qk == 0:
                return math.inf
            out += pk / sp * math.log((pk / sp) / (qk / sq))
    return out


@pytest.mark.parametrize("levels, bins", [(8, 64), (4, 30), (16, 128)])
def test_kl_divergences_match_the_slide(levels, bins):
    g = torch.Generator().manual_seed(levels)
    counts = torch.randint(0, 6, (3, bins), generator=g) * (torch.rand(3, bins, generator=g) < 0.6)
    counts[1, : bins // 2] = 0  # empty head, mass far out: infinite candidates
    counts[1, -1] = 5
    counts[2] = 0  # all values in the first bin
    counts[2, 0] = 10
    got = kl_divergences(counts, levels)
    for row in range(3):
        want = torch.tensor(
            [reference_kl(counts[row].double().tolist(), levels, i) for i in range(levels, bins + 1)],
            dtype=torch.float64,
        )
        assert torch.equal(torch.isinf(got[row]), torch.isinf(want))
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[row][finite], want[finite], rtol=0, atol=1e-12)


def test_mse_choice_is_the_brute_force_minimum_per_block():
    """The vectorised search over all blocks (with a ragged last group) reaches, for every block,
    the least error of quantizing that block alone with each candidate range."""
    w = student_t((6, 40), 3, seed=1)
    args = parse_args("w3g16-asym")
    steps, min_ratio = 25, 0.2
    lo, hi = stream("mse", args, [w], steps=steps, min_ratio=min_ratio).range()
    one_block = args.with_(granularity="tensor", group_size=None)
    ratios = torch.linspace(1.0, min_ratio, steps)
    for row in range(6):
        for group in range(3):
            x = w[row, group * 16 : (group + 1) * 16]  # the last group holds 8 real values
            bmin, bmax = x.min().reshape(1), x.max().reshape(1)
            errors = torch.tensor([
                float((fake_quantize(x, one_block, r * bmin, r * bmax) - x).pow(2).sum())
                for r in ratios
            ])
            chosen = float((fake_quantize(x, one_block, lo[row, group].reshape(1),
                                          hi[row, group].reshape(1)) - x).pow(2).sum())
            assert chosen <= float(errors.min()) * (1 + 1e-6) + 1e-12


# -- algorithms against min-max on identical data -----------------------------------------------


@pytest.mark.parametrize("name", ["percentile", "kl"])
@pytest.mark.parametrize("scheme", ["w8-tensor", "w4-tensor", "w8-tensor-asym"])
def test_clipping_observers_narrow_the_range_and_help_the_bulk(name, scheme):
    args = parse_args(scheme)
    batches = [student_t((256, 64), 2, seed) for seed in range(10)]
    x = torch.cat(batches)
    bulk = central(x)
    lo, hi = stream(name, args, batches).range()
    mlo, mhi = stream("minmax", args, batches).range()
    assert float(hi - lo) < 0.9 * float(mhi - mlo)
    assert squared_error(x, args, lo, hi, bulk) < squared_error(x, args, mlo, mhi, bulk)


def test_asymmetric_percentile_is_two_sided():
    args = parse_args("w8-tensor-asym")
    x = torch.cat([student_t((4000,), 2, 0).abs() + 1.0, torch.tensor([-0.5])])  # one low outlier
    lo, hi = stream("percentile", args, [x], percentile=99.9).range()
    torch.testing.assert_close(lo.squeeze(), torch.quantile(x, 0.001))
    torch.testing.assert_close(hi.squeeze(), torch.quantile(x, 0.999))


def test_percentile_stream_is_close_to_the_exact_single_update():
    args = parse_args("w8-tensor-asym")
    batches = [student_t((128, 64), 3, seed) for seed in range(10)]
    exact = stream("percentile", args, [torch.cat(batches)], percentile=99.9).range()
    streamed = stream("percentile", args, batches, percentile=99.9).range()
    span = float(exact[1] - exact[0])
    for e, s in zip(exact, streamed):
        assert abs(float(e - s)) < 0.01 * span


def test_kl_keeps_nearly_the_whole_range_of_uniform_data():
    args = parse_args("w8-tensor")
    batches = [torch.rand(64, 64, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in range(5)]
    _, hi = stream("kl", args, batches).range()
    assert float(hi) > 0.9  # nothing to gain from clipping a distribution with no tail


@pytest.mark.parametrize("scheme", ["w4g16", "w4g16-asym", "w3", "nf4g16", "w8-tensor", "fp4g32"])
def test_mse_is_never_worse_than_minmax_on_one_update(scheme):
    args = parse_args(scheme)
    w = student_t((24, 200), 2, seed=3)  # 200 columns: a ragged last group
    lo, hi = stream("mse", args, [w]).range()
    mse_error = squared_error(w, args, lo, hi)
    minmax_error = squared_error(w, args, *stream("minmax", args, [w]).range())
    assert mse_error < minmax_error  # heavy tails: strictly better
    gauss = torch.randn(24, 200)
    g_lo, g_hi = stream("mse", args, [gauss]).range()
    assert squared_error(gauss, args, g_lo, g_hi) <= squared_error(gauss, args, None, None)


@pytest.mark.parametrize("scheme", ["w4-tensor", "w8-tensor-asym"])
def test_mse_stream_beats_minmax_on_heavy_tails(scheme):
    args = parse_args(scheme)
    batches = [student_t((128, 64), 3, seed) for seed in range(10)]
    x = torch.cat(batches)
    observer = stream("mse", args, batches)
    assert observer.histogram is not None  # the streamed path, not the exact one
    mse_error = squared_error(x, args, *observer.range())
    assert mse_error < squared_error(x, args, *stream("minmax", args, batches).range())


def test_qparams_are_those_quantize_uses():
    args = parse_args("w4g32-asym")
    w = student_t((8, 96), 2, seed=4)
    observer = stream("mse", args, [w])
    scale, zero_point = observer.qparams()
    q = quantize(w, args, *observer.range())
    assert torch.equal(scale, q.scale) and torch.equal(zero_point, q.zero_point)


@pytest.mark.parametrize("bits", [4, 3])
def test_rtn_with_mse_scheme_beats_minmax_on_a_realistic_weight(bits):
    """A heavy-tailed 576 x 576 weight (SmolLM2's hidden size: ragged groups of 128)."""
    g = torch.Generator().manual_seed(7)
    rows = torch.rand(576, 1, generator=g) + 0.5  # rows of different scale
    w = 0.02 * rows * student_t((576, 576), 4, seed=7)
    rtn = get_method("rtn")
    plain = rtn.quantize_weight(w, parse_args(f"w{bits}g128")).objective
    searched = rtn.quantize_weight(w, parse_args(f"w{bits}g128-mse")).objective
    assert searched < 0.95 * plain
