"""QuantizedLinear and its kernels (STYLE.md section 11, tiers 1 and 3).

Kernels are checked against a float nn.Linear holding the *dequantized* weight, so only kernel
error is measured, not quantization error; repacks are checked bit for bit.
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import QuantizedTensor, get_format, pack, parse_args, quantize, unpack
from lowbit.errors import ConfigError, LowbitError
from lowbit.nn import KERNELS, KernelUnsupportedError, QuantizedLinear, get_kernel, set_kernel
from lowbit.nn.kernels import INT4_GROUPS, int4_codes, int4_group, int4_scales_and_zeros, unpack_codes

# (scheme, out_features, in_features)
DEQUANT_CASES = [
    ("w8", 48, 96),  # int8 per channel
    ("w8-tensor", 32, 64),
    ("w4g32", 64, 128),
    ("w4g64", 48, 192),
    ("w4g128", 32, 256),
    ("w4g32-asym", 64, 128),
    ("w4g64-asym", 48, 192),
    ("w4g128-asym", 32, 576),  # ragged: 576 = 4 x 128 + 64
    ("w4g64", 16, 96),  # ragged: 96 = 64 + 32
    ("w4g128", 24, 100),  # ragged and not a multiple of 8 columns
    ("w3g128", 32, 256),
    ("w3g64-asym", 24, 96),
    ("w2g64", 32, 128),
    ("w2g64-asym", 16, 96),
    ("w5g32-asym", 16, 64),
    ("nf4g64", 32, 192),
    ("fp4g32", 32, 96),
    ("fp8", 32, 64),
    ("fp8_e5m2", 16, 64),
    ("w4b16x32", 32, 96),  # 2-D blocks
]
INT8_CASES = [("w8", 48, 96), ("w8-tensor", 32, 64), ("w8", 64, 1536)]
INT4_CASES = [
    ("w4g32", 64, 128), ("w4g64", 48, 192), ("w4g128", 32, 256),
    ("w4g32-asym", 64, 128), ("w4g64-asym", 48, 192), ("w4g128-asym", 32, 256),
    ("w4g128", 16, 576),  # 576 in groups of 128 (ragged) -> kernel groups of 64
    ("w4", 32, 192),  # per channel -> kernel groups of 64
    ("w4b16x32", 32, 96),
]


def quantized(scheme: str, n: int, k: int, seed: int = 0) -> tuple[QuantizedTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g) * 0.1
    return quantize(weight, parse_args(scheme)), bias


def reference(qweight: QuantizedTensor, bias: torch.Tensor) -> nn.Linear:
    n, k = qweight.shape
    layer = nn.Linear(k, n)
    with torch.no_grad():
        layer.weight.copy_(qweight.dequantize(torch.float32))
        layer.bias.copy_(bias)
    return layer


def assert_close_to(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    cos = F.cosine_similarity(y.flatten().double(), ref.flatten().double(), dim=0)
    assert cos >= 0.9999
    err = (y.float() - ref.float()).abs().max()
    assert err <= rel * ref.abs().max(), f"max error {err:.3g} vs {ref.abs().max():.3g}"


def check_kernel(kernel: str, scheme: str, n: int, k: int, rel: float) -> None:
    qweight, bias = quantized(scheme, n, k)
    ref = reference(qweight, bias)
    with_bias = QuantizedLinear(qweight, bias, kernel=kernel)
    no_bias = QuantizedLinear(qweight, kernel=kernel)
    x2 = torch.randn(5, k)
    x3 = torch.randn(2, 7, k)
    with torch.no_grad():
        for x in (x2, x3):
            y = with_bias(x)
            assert y.shape == (*x.shape[:-1], n)
            assert_close_to(y, ref(x), rel)
            assert_close_to(no_bias(x), F.linear(x, ref.weight), rel)


# -- tier 3: each kernel against a float layer holding the dequantized weight -----------------


@pytest.mark.parametrize("scheme,n,k", DEQUANT_CASES)
def test_dequant_matches_float_layer(scheme, n, k):
    check_kernel("dequant", scheme, n, k, rel=1e-6)


@pytest.mark.parametrize("scheme,n,k", DEQUANT_CASES)
def test_dequant_weight_is_bit_exact(scheme, n, k):
    qweight, _ = quantized(scheme, n, k)
    layer = QuantizedLinear(qweight)
    w = get_kernel("dequant").weight(layer.prepared(), torch.float32)
    assert torch.equal(w, qweight.dequantize(torch.float32))


@pytest.mark.parametrize("scheme,n,k", INT8_CASES)
def test_int8_matches_float_layer(scheme, n, k):
    check_kernel("int8", scheme, n, k, rel=1e-5)


@pytest.mark.parametrize("scheme,n,k", INT4_CASES)
def test_int4_matches_float_layer(scheme, n, k):
    check_kernel("int4", scheme, n, k, rel=1e-5)


@pytest.mark.parametrize("scheme,n,k", INT8_CASES[:2])
def test_int8_bf16_matches_float_layer(scheme, n, k):
    """Computes in bfloat16 (input and scales rounded to 8 significant bits)."""
    check_kernel("int8-bf16", scheme, n, k, rel=2e-2)


@pytest.mark.parametrize("scheme,n,k", [INT4_CASES[i] for i in (1, 4, 6)])
def test_int4_bf16_matches_float_layer(scheme, n, k):
    check_kernel("int4-bf16", scheme, n, k, rel=2e-2)


def test_bf16_kernels_return_the_input_dtype():
    qweight, bias = quantized("w4g64", 32, 128)
    layer = QuantizedLinear(qweight, bias, kernel="int4-bf16")
    assert layer(torch.randn(2, 128)).dtype == torch.float32


@pytest.mark.parametrize("scheme,n,k", [("w8", 32, 64), ("w4g64-asym", 48, 192), ("nf4g64", 32, 96)])
def test_cached_matches_float_layer(scheme, n, k):
    check_kernel("cached", scheme, n, k, rel=1e-6)


def float_zero_point_weight(n=32, k=128, group=64) -> QuantizedTensor:
    """uint4 codes with float zero points in units of the scale, as HQQ stores them."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=g) * 0.01 + 1e-3).half()
    zero = (torch.rand(n, k // group, generator=g) * 15).half()
    return QuantizedTensor.from_codes(
        codes, scale, zero, get_format("uint4"), (1, group), torch.float32
    )


@pytest.mark.parametrize("kernel", ["dequant", "int4", "cached"])
def test_float_zero_points(kernel):
    qweight = float_zero_point_weight()
    layer = QuantizedLinear(qweight, kernel=kernel)
    x = torch.randn(3, 128)
    assert_close_to(layer(x), F.linear(x, qweight.dequantize(torch.float32)), rel=1e-5)


def test_group_index_through_dequant():
    """Act-order: column k uses group group_index[k]."""
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-8, 8, (16, 96), generator=g, dtype=torch.int8)
    scale = (torch.rand(16, 3, generator=g) + 0.5).half()
    group_index = torch.randperm(96, generator=g) // 32
    qweight = QuantizedTensor.from_codes(
        codes, scale, None, get_format("int4"), (1, 32), torch.float32, group_index.int()
    )
    layer = QuantizedLinear(qweight)
    expected = codes.float() * scale.float()[:, group_index]
    assert torch.equal(get_kernel("dequant").weight(layer.prepared(), torch.float32), expected)
    assert layer.kernel_support("int4") is not None
    x = torch.randn(4, 96)
    assert_close_to(layer(x), F.linear(x, expected), rel=1e-6)


@pytest.mark.parametrize("kernel,scheme", [("dequant", "w4g64-asym"), ("dequant", "nf4g64"),
                                           ("int4", "w4g64-asym"), ("int8", "w8")])
def test_bfloat16_activations(kernel, scheme):
    qweight, bias = quantized(scheme, 32, 128)
    layer = QuantizedLinear(qweight, bias, kernel=kernel)
    x = torch.randn(4, 128)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = F.linear(x, qweight.dequantize(torch.float32), bias)
    err = (y.float() - ref).abs().max()
    assert err <= 0.02 * ref.abs().max()


# -- tier 1: repacking, bit for bit ------------------------------------------------------------


def test_unpack_codes_golden():
    # 4-bit: low nibble first. 2-bit: bits 0-1 first. 1-bit: bit 0 first.
    assert unpack_codes(torch.tensor([[0x21, 0xF0]], dtype=torch.uint8), 4, 4).tolist() == [
        [1, 2, 0, 15]]
    assert unpack_codes(torch.tensor([[0xE4, 0x1B]], dtype=torch.uint8), 2, 8).tolist() == [
        [0, 1, 2, 3, 3, 2, 1, 0]]
    assert unpack_codes(torch.tensor([[0x05]], dtype=torch.uint8), 1, 8).tolist() == [
        [1, 0, 1, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_codes_equals_canonical_unpack(bits):
    codes = torch.randint(0, 1 << bits, (7, 45), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert torch.equal(unpack_codes(packed, bits, 45), codes)
    assert torch.equal(unpack_codes(packed, bits, 45), unpack(packed, bits, 45))


def test_int8_prepare_is_the_canonical_codes():
    qweight, _ = quantized("w8", 48, 96)
    p = get_kernel("int8").prepare(qweight)
    assert p.weight.dtype == torch.int8
    assert torch.equal(p.weight, qweight.codes())
    assert torch.equal(p.scale, qweight.scale.float()[:, 0])


@pytest.mark.parametrize("scheme,n,k", INT4_CASES)
def test_int4_repack_is_bit_exact(scheme, n, k):
    qweight, _ = quantized(scheme, n, k)
    fmt = qweight.format
    codes = qweight.codes().to(torch.int32)
    q = int4_codes(qweight)
    # The kernel reads q - 8: signed codes c are stored as c + 8, unsigned codes as they are.
    assert torch.equal(q, codes - fmt.qmin if fmt.signed else codes)

    group = int4_group(qweight)
    assert group in INT4_GROUPS and k % group == 0 and qweight.block_size[-1] % group == 0
    sz = int4_scales_and_zeros(qweight, group)
    assert sz.shape == (k // group, n, 2)
    scale = qweight.expand(qweight.scale.float())[:, ::group]  # (n, k / group)
    assert torch.equal(sz[..., 0], scale.t())
    if qweight.zero_point is None:
        assert torch.equal(sz[..., 1], torch.zeros_like(scale.t()))
    else:
        zero = qweight.expand(qweight.zero_point.float())[:, ::group]
        assert torch.equal(sz[..., 1], ((8 - zero) * scale).t())

    # Read torch's opaque layout back through the kernel itself: with scale 1 and zero 8 it
    # computes w = q, and an identity input returns w exactly (one nonzero term per output).
    packed = get_kernel("int4").prepare(qweight).packed
    ones = torch.stack((torch.ones(k // group, n), torch.full((k // group, n), 8.0)), -1)
    read = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k), packed, group, ones)
    assert torch.equal(read.t(), q.float())


def test_int4_group_choice():
    assert int4_group(quantized("w4g128", 16, 256)[0]) == 128
    assert int4_group(quantized("w4g128", 16, 576)[0]) == 64  # 576 = 4.5 x 128
    assert int4_group(quantized("w4", 16, 96)[0]) == 32
    assert int4_group(quantized("w4g16", 16, 64)[0]) is None


def test_canonical_buffers_are_not_copied_for_dequant():
    qweight, _ = quantized("w4g64", 32, 128)
    layer = QuantizedLinear(qweight)
    assert layer.prepared().qdata is layer.qdata


# -- support and errors ------------------------------------------------------------------------


@pytest.mark.parametrize("kernel,scheme,n,k,words", [
    ("int4", "nf4g64", 32, 128, "int4 or uint4"),
    ("int4", "w8", 32, 128, "int4 or uint4"),
    ("int4", "w4g64", 24, 128, "divisible by 16"),
    ("int4", "w4g16", 32, 128, "dividing both"),
    ("int4", "w4g128", 32, 600, "dividing both"),
    ("int8", "w4g64", 32, 128, "int8"),
    ("int8", "w8g64", 32, 128, "one scale per output row"),
])
def test_unsupported_kernel_names_the_reason(kernel, scheme, n, k, words):
    qweight, _ = quantized(scheme, n, k)
    with pytest.raises(KernelUnsupportedError, match=words) as info:
        QuantizedLinear(qweight, kernel=kernel)
    assert isinstance(info.value, LowbitError)
    assert "dequant" in str(info.value)
    layer = QuantizedLinear(qweight)
    with pytest.raises(KernelUnsupportedError):
        layer.set_kernel(kernel)
    assert layer.kernel == "dequant"  # a refused change leaves the layer as it was


def test_unknown_kernel():
    qweight, _ = quantized("w4g64", 32, 128)
    with pytest.raises(ConfigError, match="unknown kernel 'marlin'; available: .*dequant"):
        QuantizedLinear(qweight, kernel="marlin")


def test_fused_kernels_refuse_other_devices():
    qweight, _ = quantized("w4g64", 32, 128)
    assert "CPU only" in get_kernel("int4").supports(qweight, torch.device("cuda"))
    assert get_kernel("int4").supports(qweight, torch.device("cpu")) is None
    for name in ("dequant", "cached"):
        assert get_kernel(name).supports(qweight, torch.device("cuda")) is None
    w8, _ = quantized("w8", 32, 128)
    assert "CPU only" in get_kernel("int8").supports(w8, torch.device("cuda"))


def test_registry_lists_the_builtin_kernels():
    assert list(KERNELS) == ["dequant", "int8", "int8-bf16", "int4", "int4-bf16", "cached"]


# -- state_dict, memory, model-wide choice ------------------------------------------------------


@pytest.mark.parametrize("kernel", ["dequant", "int4", "int4-bf16", "cached"])
def test_state_dict_round_trip(kernel):
    qweight, bias = quantized("w4g64-asym", 48, 192, seed=0)
    layer = QuantizedLinear(qweight, bias, kernel=kernel)
    state = layer.state_dict()
    assert set(state) == {"qdata", "scale", "zero_point", "bias"}
    # A fresh layer of the same layout holding other values must reproduce the saved one.
    other, other_bias = quantized("w4g64-asym", 48, 192, seed=1)
    fresh = QuantizedLinear(other, other_bias, kernel=kernel)
    x = torch.randn(3, 192)
    assert not torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), layer(x))


def test_int8_state_dict_keys():
    qweight, _ = quantized("w8", 32, 64)
    assert set(QuantizedLinear(qweight, kernel="int8").state_dict()) == {"qdata", "scale"}


def buffer_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.buffers())


@pytest.mark.parametrize("scheme", ["w4g32", "w4g128-asym"])
def test_int4_module_memory(scheme):
    n, k = 256, 512
    layer = QuantizedLinear(quantized(scheme, n, k)[0])
    assert buffer_bytes(layer) < 0.3 * n * k * 4
    assert buffer_bytes(QuantizedLinear(quantized(scheme, n, k)[0], kernel="cached")) > n * k * 4


def quantize_linears(model: nn.Module, scheme_for) -> None:
    """Replace every nn.Linear except lm_head by a QuantizedLinear (scheme per name)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent_name, _, child = name.rpartition(".")
            qweight = quantize(module.weight.data, parse_args(scheme_for(name)))
            setattr(model.get_submodule(parent_name), child, QuantizedLinear(qweight, module.bias))


def test_set_kernel_on_a_model_falls_back_and_logs(tiny_llama, caplog):
    quantize_linears(tiny_llama, lambda name: "nf4g32" if "v_proj" in name else "w4g32")
    ids = torch.randint(0, 259, (1, 12))
    with torch.no_grad():
        expected = tiny_llama(ids).logits
    with caplog.at_level(logging.INFO, logger="lowbit.nn.linear"):
        choice = set_kernel(tiny_llama, "int4")
    assert choice.counts() == {"int4": 12, "dequant": 2}  # 2 layers x 7 linears
    assert set(choice.reasons) == {f"model.layers.{i}.self_attn.v_proj" for i in range(2)}
    assert "int4: 12, dequant: 2" in caplog.text and "int4 or uint4" in caplog.text
    with torch.no_grad():
        got = tiny_llama(ids).logits
    assert_close_to(got, expected, rel=1e-4)

    with pytest.raises(KernelUnsupportedError):
        set_kernel(tiny_llama, "int4", fallback=None)
    with pytest.raises(ConfigError):
        set_kernel(tiny_llama, "no-such-kernel")
    assert set_kernel(tiny_llama, "dequant").counts() == {"dequant": 14}
