"""Core formats, qparams, quantize, packing, QuantizedTensor: exact against slow references."""

import math

import numpy as np
import pytest
import torch

from lowbit.core import (
    QuantArgs,
    QuantizedTensor,
    fake_quantize,
    get_format,
    pack,
    packed_length,
    parse_args,
    quantize,
    unpack,
)
from lowbit.core.formats import FP4_LEVELS, NF4_LEVELS
from lowbit.errors import ConfigError

# -- packing: golden words computed by hand ------------------------------------------------


def test_pack_4bit_golden():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]


def test_pack_2bit_golden():
    # byte 0: 0 | 1<<2 | 2<<4 | 3<<6 = 0b11_10_01_00; byte 1: 3 | 2<<2 | 1<<4 | 0<<6
    codes = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    assert pack(codes, 2).tolist() == [0b11100100, 0b00011011]


def test_pack_3bit_golden():
    # 24-bit word sum(c_j << 3j) for c = 1..7, 0 is 0x1F58D1, stored little-endian
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    assert pack(codes, 3).tolist() == [0xD1, 0x58, 0x1F]


def test_pack_pads_ragged_rows_with_zero_codes():
    codes = torch.tensor([[15, 15, 15]])
    assert pack(codes, 4).tolist() == [[0xFF, 0x0F, 0x00, 0x00]]
    assert packed_length(3, 4) == 4


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64, 576])
def test_pack_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (3, 5, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == packed_length(n, bits)
    assert torch.equal(unpack(packed, bits, n), codes)


# -- formats -------------------------------------------------------------------------------


def test_integer_format_ranges():
    assert (get_format("int4").qmin, get_format("int4").qmax) == (-8, 7)
    assert (get_format("uint4").qmin, get_format("uint4").qmax) == (0, 15)
    assert (get_format("int8").qmin, get_format("int8").qmax) == (-128, 127)
    assert (get_format("int2").qmin, get_format("int2").qmax) == (-2, 1)


def test_fp4_levels_follow_e2m1_encoding():
    # code = sign<<3 | exponent<<1 | mantissa; value = 2^(e-1) * (1 + m/2), subnormal 0.5*m
    for code in range(16):
        s, e, m = code >> 3, (code >> 1) & 3, code & 1
        value = (0.5 * m) if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
        assert FP4_LEVELS[code] == (-value if s else value)


def test_unknown_format_error_names_known_formats():
    with pytest.raises(ConfigError, match="nf4"):
        get_format("int9")


# -- schemes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, fmt, sym, gran, group",
    [
        ("w8", "int8", True, "channel", None),
        ("w4g128", "int4", True, "group", 128),
        ("w4g128-asym", "int4", False, "group", 128),
        ("w3g128", "int3", True, "group", 128),
        ("w2g64-asym", "int2", False, "group", 64),
        ("nf4", "nf4", True, "group", 64),
        ("fp8", "fp8_e4m3", True, "channel", None),
        ("fp8_e5m2", "fp8_e5m2", True, "channel", None),
    ],
)
def test_parse_scheme(spec, fmt, sym, gran, group):
    a = parse_args(spec)
    assert (a.format, a.symmetric, a.granularity, a.group_size) == (fmt, sym, gran, group)
    assert parse_args(a.name()) == a


def test_scheme_errors_are_clear():
    with pytest.raises(ConfigError, match="unknown weight scheme"):
        parse_args("w4g")
    with pytest.raises(ConfigError, match="symmetric only"):
        QuantArgs("nf4", symmetric=False, group_size=64)
    with pytest.raises(ConfigError, match="unknown field"):
        QuantArgs.from_dict({"format": "int4", "groupsize": 128})


def test_args_dict_round_trip():
    a = QuantArgs("int4", symmetric=False, granularity="block", group_size=None, block_shape=(64, 32))
    assert QuantArgs.from_dict(a.to_dict()) == a


def test_block_size_lowering():
    shape = (576, 1536)
    assert parse_args("w8").block_size(shape) == (1, 1536)
    assert parse_args("w4g128").block_size(shape) == (1, 128)
    assert parse_args("w4-tensor").block_size(shape) == shape
    assert parse_args("w8b128x128").block_size(shape) == (128, 128)
    assert QuantArgs("int8", granularity="token", group_size=None).block_size((2, 7, 64)) == (1, 1, 64)


# -- quantize against a slow reference -----------------------------------------------------


def reference_int_quantize(w: np.ndarray, bits: int, group: int, symmetric: bool):
    """Element by element with Python floats; scale rounded to float16 as lowbit stores it."""
    rows, cols = w.shape
    out = np.zeros_like(w)
    codes = np.zeros(w.shape, dtype=np.int64)
    for r in range(rows):
        for g0 in range(0, cols, group):
            block = [float(v) for v in w[r, g0 : g0 + group]]
            lo, hi = min(block), max(block)
            if symmetric:
                qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
                scale = max(abs(lo), abs(hi)) / qmax
                zp = 0
            else:
                qmin, qmax = 0, 2**bits - 1
                lo, hi = min(lo, 0.0), max(hi, 0.0)
                scale = (hi - lo) / (qmax - qmin)
            scale = float(np.float16(np.float32(scale)))
            if not symmetric:
                zp = min(max(round(-lo / scale), qmin), qmax)
            for j, v in enumerate(block):
                q = min(max(round(float(np.float32(v) / np.float32(scale))) + zp, qmin), qmax)
                codes[r, g0 + j] = q
                out[r, g0 + j] = np.float32(q - zp) * np.float32(scale)
    return codes, out


@pytest.mark.parametrize(
    "bits, group, symmetric", [(4, 32, True), (4, 32, False), (3, 24, True), (2, 16, False), (8, 40, True)]
)
def test_int_quantize_matches_reference(bits, group, symmetric):
    g = torch.Generator().manual_seed(bits + group)
    w = torch.randn(6, 80, generator=g)  # 80 is not a multiple of 24 or 40*... ragged when it is not
    args = QuantArgs(f"int{bits}", symmetric=symmetric, group_size=group)
    q = quantize(w, args)
    ref_codes, ref_deq = reference_int_quantize(w.numpy(), bits, group, symmetric)
    assert torch.equal(q.codes().to(torch.int64), torch.from_numpy(ref_codes))
    assert torch.equal(q.dequantize(), torch.from_numpy(ref_deq))


def test_ragged_last_group_uses_only_its_own_columns():
    w = torch.randn(4, 576)
    w[:, 512:] *= 0.01  # last (ragged) group is small; its scale must not see other columns
    q = quantize(w, parse_args("w4g128"))
    assert q.scale.shape == (4, 5)
    expected = (w[:, 512:].abs().amax(1) / 7).half()
    assert torch.equal(q.scale[:, 4], expected)


def test_lookup_formats_pick_nearest_level():
    w = torch.randn(8, 64)
    for name in ("nf4", "fp4"):
        args = QuantArgs(name, group_size=32)
        q = quantize(w, args)
        levels = torch.tensor(NF4_LEVELS if name == "nf4" else FP4_LEVELS)
        scale = q.expand(q.scale).float()
        brute = (w.unsqueeze(-1) / scale.unsqueeze(-1) - levels).abs().argmin(-1)
        # equal values (+0/-0 in fp4) may pick either code; compare the chosen level values
        assert torch.equal(levels[q.codes().long()], levels[brute])


def test_fp8_matches_torch_cast():
    w = torch.randn(16, 48) * 3
    q = quantize(w, parse_args("fp8"))
    scale = q.expand(q.scale).float()
    expected = (w / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(q.dequantize(), expected)


def test_block_2d_scales():
    w = torch.randn(100, 70)
    args = parse_args("w8b32x32")
    q = quantize(w, args)
    assert q.scale.shape == (4, 3)
    assert torch.equal(q.scale[3, 2], (w[96:, 64:].abs().max() / 127).half())


@pytest.mark.parametrize("spec", ["w8", "w4g128", "w4g128-asym", "w3g128", "w2g64-asym", "nf4", "fp4", "fp8"])
def test_fake_quantize_equals_dequantized_quantize(spec):
    w = torch.randn(64, 576)
    args = parse_args(spec)
    assert torch.equal(fake_quantize(w, args), quantize(w, args).dequantize())


def test_zero_block_gives_zero_and_finite_scale():
    w = torch.zeros(2, 64)
    for spec in ("w4g32", "w4g32-asym", "nf4", "fp8"):
        q = quantize(w, parse_args(spec))
        assert torch.isfinite(q.scale.float()).all()
        assert torch.equal(q.dequantize(), w)


# -- the noise model: uniform rounding error has variance scale^2 / 12 ---------------------


@pytest.mark.parametrize("spec", ["w8-tensor", "w4-tensor", "w8"])
def test_rounding_noise_variance_is_scale_squared_over_12(spec):
    g = torch.Generator().manual_seed(1)
    w = torch.rand(256, 4096, generator=g) * 2 - 1  # spread over many quantization steps
    q = quantize(w, parse_args(spec))
    err = (q.dequantize() - w).double()
    scale = q.expand(q.scale).double()
    predicted = (scale**2 / 12).mean()
    assert abs(err.var().item() / predicted.item() - 1) < 0.10


# -- QuantizedTensor ------------------------------------------------------------------------


def test_tensors_metadata_round_trip_is_bit_exact():
    w = torch.randn(32, 200)
    for spec in ("w4g64-asym", "w3g128", "nf4", "fp8", "w8"):
        q = quantize(w, parse_args(spec))
        back = QuantizedTensor.from_tensors(q.tensors(), q.metadata())
        assert torch.equal(back.dequantize(), q.dequantize())


def test_group_index_selects_scale_columns():
    w = torch.randn(4, 8)
    q = quantize(w, parse_args("w4g4"))
    perm = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0], dtype=torch.int32)
    gi = QuantizedTensor(q.qdata, q.scale, None, q.format, q.block_size, q.shape, q.dtype, perm)
    expected = q.codes().float() * q.scale.float()[:, perm.long()]
    assert torch.equal(gi.dequantize(), expected)


def test_bits_per_weight_counts_scales_and_zero_points():
    w = torch.randn(576, 576)
    sym = quantize(w, parse_args("w4g128"))
    asym = quantize(w, parse_args("w4g128-asym"))
    # 5 groups per row: 5 fp16 scales (+ 5 packed 4-bit zero points = 4 bytes with padding)
    assert math.isclose(sym.bits_per_weight, (576 * 288 + 576 * 5 * 2) * 8 / 576**2)
    assert math.isclose(asym.bits_per_weight, sym.bits_per_weight + 576 * 4 * 8 / 576**2)
