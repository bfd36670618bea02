"""GPTQ and AWQ export: hand-worked golden words for both packings, round trips through a
folder on tiny models, an independent numpy dequantizer written from the published formulas,
folders packed by an independent writer, and the refusals.

No real reader runs here: transformers loads both layouts only through GPTQModel (and optimum),
which are not installed (``test_transformers_loads_*`` skip without them)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lowbit.core import parse_args, quantize as quantize_tensor
from lowbit.core.formats import get_format
from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import ModelLoadError
from lowbit.export import EXPORTERS, ExportError, export, read_checkpoint
from lowbit.export.awq import pack_awq, to_awq, unpack_awq
from lowbit.export.base import float_tensors, quantized_linears
from lowbit.export.gptq import from_gptq, pack_int32, to_gptq, unpack_int32
from lowbit.methods.gptq import GPTQConfig, gptq
from lowbit.models.tiny import byte_tokenizer, tiny_model
from lowbit.nn import QuantizedLinear
from lowbit.quantize import quantize
from lowbit.recipe import Recipe

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ gemm.py: nibble i holds column order_map[i]


def i32(word: int) -> int:
    """An unsigned 32-bit word as the int32 that safetensors stores."""
    return word - (1 << 32) if word >= 1 << 31 else word


# -- golden words, worked out by hand from the published layouts --------------------------------


def test_gptq_4bit_words_pack_along_the_input_dim():
    # column 0 holds codes 0..7 down K: nibble k = code k -> 0x76543210
    # column 1 holds 15..8 -> nibbles F, E, D, C, B, A, 9, 8 from the low end -> 0x89ABCDEF
    codes = torch.tensor([[k, 15 - k] for k in range(8)])
    assert pack_int32(codes, 4).tolist() == [[0x76543210, i32(0x89ABCDEF)]]


def test_gptq_2bit_and_8bit_words():
    two = torch.zeros(16, 1, dtype=torch.int64)
    two[0], two[15] = 3, 1  # bits 0-1 = 0b11, bits 30-31 = 0b01
    assert pack_int32(two, 2).tolist() == [[0x40000003]]
    eight = torch.tensor([[1], [2], [3], [0xF0]])  # byte k = code k
    assert pack_int32(eight, 8).tolist() == [[i32(0xF0030201)]]


def test_gptq_3bit_codes_straddle_words():
    # 32 codes fill 3 words; code k sits at bits 3k..3k+2 of the 96-bit stream.
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[0] = 1  # word 0 bit 0
    codes[10] = 7  # bits 30..32: word 0 bits 30, 31 and word 1 bit 0
    codes[21] = 5  # 0b101 at bits 63..65: word 1 bit 31 (1), word 2 bits 0-1 (0b10)
    codes[31] = 4  # bits 93..95: word 2 bit 31
    words = [0xC0000001, 0x80000001, 0x80000002]
    assert pack_int32(codes, 3).T.tolist() == [[i32(w) for w in words]]
    assert torch.equal(unpack_int32(pack_int32(codes, 3), 3, 32), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_unpack_inverts_pack(bits):
    codes = torch.randint(0, 1 << bits, (96, 5))
    assert torch.equal(unpack_int32(pack_int32(codes, bits), bits, 96), codes)


def _qt(codes, scale, zero_point, fmt, group, group_index=None):
    return QuantizedTensor.from_codes(codes, scale, zero_point, get_format(fmt), (1, group), torch.float32,
                                      group_index)


def test_gptq_symmetric_int4_is_stored_plus_8_with_zero_point_7():
    # one output row, 8 input columns, codes -8..-1: stored 0..7 -> 0x76543210; zero 8 stored as 7
    # in each of the 8 nibbles of a qzeros word (8 output rows) -> 0x77777777
    codes = torch.arange(-8, 0, dtype=torch.int8).repeat(8, 1)
    qt = _qt(codes, torch.ones(8, 1, dtype=torch.float16), None, "int4", 8)
    parts, shifted, _ = to_gptq(qt)
    assert parts["qweight"].tolist() == [[0x76543210] * 8]
    assert parts["qzeros"].tolist() == [[0x77777777]]
    assert parts["g_idx"].tolist() == [0] * 8 and shifted == 0


def test_gptq_asymmetric_zero_points_are_stored_minus_one_along_the_output_dim():
    # zero points 1..8 of output rows 0..7 -> stored 0..7 -> 0x76543210
    codes = torch.zeros(8, 8, dtype=torch.uint8)
    zp = torch.arange(1, 9, dtype=torch.uint8).view(8, 1)
    parts, _, _ = to_gptq(_qt(codes, torch.ones(8, 1, dtype=torch.float16), zp, "uint4", 8))
    assert parts["qzeros"].tolist() == [[0x76543210]]


def test_awq_words_interleave_the_output_columns():
    # a row with codes 0..7 in columns 0..7: nibbles hold columns 0, 2, 4, 6, 1, 3, 5, 7 -> 0x75316420
    assert pack_awq(torch.arange(8).view(1, 8)).tolist() == [[0x75316420]]
    one_hot = torch.zeros(3, 8, dtype=torch.int64)
    one_hot[0, 0] = one_hot[1, 1] = one_hot[2, 7] = 15  # column 1 -> nibble 4, column 7 -> nibble 7
    assert pack_awq(one_hot).tolist() == [[0xF], [0xF0000], [i32(0xF0000000)]]
    codes = torch.randint(0, 16, (5, 24))
    assert torch.equal(unpack_awq(pack_awq(codes)), codes)


def test_awq_symmetric_int4_zero_point_8_in_every_nibble():
    codes = torch.zeros(8, 16, dtype=torch.int8)
    parts = to_awq(_qt(codes, torch.ones(8, 2, dtype=torch.float16), None, "int4", 8))
    assert parts["qzeros"].tolist() == [[i32(0x88888888)], [i32(0x88888888)]]
    assert parts["qweight"].shape == (16, 1) and parts["scales"].shape == (2, 8)


# -- an independent reader: numpy shifts from the published formulas ---------------------------


def _u32(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32).astype(np.int64)


def numpy_gptq_weight(qweight, qzeros, scales, g_idx, bits, zero_offset=1) -> np.ndarray:
    """W (N, K) = scales[g, n] * (q[k, n] - (z[g, n] + 1)) with g = g_idx[k]: unpacked with
    per-code shifts for 2/4/8 bits, through one big integer per column for 3 bits."""
    qw, qz = _u32(qweight), _u32(qzeros)
    k, n = qw.shape[0] * 32 // bits, qw.shape[1]
    mask = (1 << bits) - 1
    if bits == 3:
        def stream(words):  # words along axis 0 -> codes along axis 0
            out = np.zeros((words.shape[0] * 32 // 3, words.shape[1]), dtype=np.int64)
            for c in range(words.shape[1]):
                big = sum(int(w) << (32 * i) for i, w in enumerate(words[:, c]))
                out[:, c] = [(big >> (3 * j)) & 7 for j in range(out.shape[0])]
            return out
        q, z = stream(qw), stream(qz.T).T
    else:
        per = 32 // bits
        rows = np.arange(k)
        q = (qw[rows // per] >> (bits * (rows % per))[:, None]) & mask
        cols = np.arange(n)
        z = (qz[:, cols // per] >> (bits * (cols % per))[None, :]) & mask
    g = g_idx.numpy().astype(np.int64)
    s = scales.float().numpy()
    return (s[g] * (q - (z[g] + zero_offset))).T.astype(np.float32)


def numpy_awq_weight(qweight, qzeros, scales, group_size) -> np.ndarray:
    """W (N, K) = scales[k // g, n] * (q[k, n] - z[k // g, n]), nibble of column n at
    position order_map.index(n % 8) of word n // 8."""
    qw, qz = _u32(qweight), _u32(qzeros)
    n = qw.shape[1] * 8
    cols = np.arange(n)
    shift = 4 * np.array([AWQ_ORDER.index(c % 8) for c in cols])
    q = (qw[:, cols // 8] >> shift) & 15
    z = (qz[:, cols // 8] >> shift) & 15
    g = np.arange(qw.shape[0]) // group_size
    return (scales.float().numpy()[g] * (q - z[g])).T.astype(np.float32)


def _quantized(scheme, kind="llama", **recipe):
    model = tiny_model(kind, seed=0)
    quantize(model, Recipe(scheme=scheme, **recipe), progress=False)
    return model


def _files(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors")), json.loads((folder / "config.json").read_text())


def _assert_same_layers(a, b, same_codes=True):
    la, lb = quantized_linears(a), quantized_linears(b)
    assert la.keys() == lb.keys()
    for name in la:
        qa, qb = la[name].qweight, lb[name].qweight
        torch.testing.assert_close(qb.dequantize(torch.float32), qa.dequantize(torch.float32), rtol=0, atol=0)
        if same_codes:
            assert qa.format == qb.format and qa.block_size == qb.block_size, name
            assert torch.equal(qa.codes(), qb.codes()) and torch.equal(qa.scale, qb.scale), name
            assert (qa.zero_point is None) == (qb.zero_point is None), name
            if qa.zero_point is not None:
                assert torch.equal(qa.zero_point.long(), qb.zero_point.long()), name
            assert (qa.group_index is None) == (qb.group_index is None), name
            if qa.group_index is not None:
                assert torch.equal(qa.group_index.long(), qb.group_index.long()), name
        bias_a, bias_b = la[name].bias, lb[name].bias
        assert (bias_a is None) == (bias_b is None) and (bias_a is None or torch.equal(bias_a, bias_b))


def _same_logits(a, b):
    ids = torch.randint(0, 259, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("scheme, kind", [
    ("w4g32", "llama"), ("w4g32-asym", "qwen2"), ("w3g32", "llama"), ("w8", "llama"),
    ("w4g48", "llama"),  # ragged: 64 = 48 + 16 and 160 = 3 * 48 + 16 columns
])
def test_gptq_round_trip_and_independent_dequantizer(tmp_path, scheme, kind):
    model = _quantized(scheme, kind)
    report = export(model, byte_tokenizer(), "gptq", tmp_path / "out")
    assert report.lossy == []
    tensors, config = _files(tmp_path / "out")
    qc = config["quantization_config"]
    args = parse_args(scheme)
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert (qc["bits"], qc["sym"], qc["desc_act"]) == (args.bits, args.symmetric, False)
    assert qc["group_size"] == (args.group_size or -1)
    for name, layer in quantized_linears(model).items():
        expected = layer.qweight.dequantize(torch.float32).numpy()
        got = numpy_gptq_weight(*(tensors[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")),
                                args.bits)
        np.testing.assert_array_equal(got, expected)
    if scheme == "w4g48":
        assert "last group 16 columns" in report.layers["model.layers.0.self_attn.q_proj"]
    back, _, name = read_checkpoint(tmp_path / "out")
    assert name == "gptq"
    _assert_same_layers(model, back)
    _same_logits(model, back)


@pytest.mark.parametrize("scheme, kind", [("w4g32-asym", "llama"), ("w4g32", "qwen2")])
def test_awq_round_trip_and_independent_dequantizer(tmp_path, scheme, kind):
    model = _quantized(scheme, kind)
    report = export(model, byte_tokenizer(), "awq", tmp_path / "out")
    assert report.lossy == [] and report.bits_per_weight == pytest.approx(4 + 16 / 32 + 4 / 32)
    tensors, config = _files(tmp_path / "out")
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["version"], qc["w_bit"], qc["q_group_size"], qc["zero_point"]) == (
        "awq", "gemm", 4, 32, True)
    for name, layer in quantized_linears(model).items():
        got = numpy_awq_weight(*(tensors[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales")), 32)
        np.testing.assert_array_equal(got, layer.qweight.dequantize(torch.float32).numpy())
    back, _, name = read_checkpoint(tmp_path / "out")
    assert name == "awq"
    _assert_same_layers(model, back)
    _same_logits(model, back)


def _act_order_layer(model, name="model.layers.0.mlp.down_proj"):
    """Replace ``name`` by GPTQ with act order and dynamic groups, so it carries a group_index."""
    linear = model.get_submodule(name)
    w = linear.weight.data if isinstance(linear, torch.nn.Linear) else linear.qweight.dequantize(torch.float32)
    x = torch.randn(256, w.shape[1]) * torch.linspace(0.1, 3, w.shape[1])
    qt = gptq(w, 2 * x.T @ x / len(x), parse_args("w4g32"), GPTQConfig(static_groups=False)).qweight
    assert qt.group_index is not None
    model.set_submodule(name, QuantizedLinear(qt, None))
    return qt


def test_gptq_act_order_writes_g_idx_and_desc_act(tmp_path):
    model = _quantized("w4g32")
    qt = _act_order_layer(model)
    export(model, byte_tokenizer(), "gptq", tmp_path / "out")
    tensors, config = _files(tmp_path / "out")
    assert config["quantization_config"]["desc_act"] is True
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(tensors[f"{name}.g_idx"], qt.group_index.to(torch.int32))
    got = numpy_gptq_weight(*(tensors[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")), 4)
    np.testing.assert_array_equal(got, qt.dequantize(torch.float32).numpy())
    back, _, _ = read_checkpoint(tmp_path / "out")
    _assert_same_layers(model, back)


def test_gptq_zero_point_0_is_written_as_1_and_reported(tmp_path):
    # group 0 of row 0 has zero point 0 and codes 15 and 3: written as zero 1, codes 15 and 4, so
    # the 15 drops one step; every other value is exact
    codes = torch.full((32, 64), 5, dtype=torch.uint8)
    codes[0, 0], codes[0, 1] = 15, 3
    zp = torch.full((32, 2), 7, dtype=torch.uint8)
    zp[0, 0] = 0
    qt = _qt(codes, torch.full((32, 2), 0.5, dtype=torch.float16), zp, "uint4", 32)
    parts, shifted, moved = to_gptq(qt)
    assert (shifted, moved) == (1, 1)
    back = from_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], 4, 32, False)
    diff = qt.dequantize(torch.float32) - back.dequantize(torch.float32)
    assert diff[0, 0] == 0.5 and int((diff != 0).sum()) == 1


def test_gptq_lossy_zero_point_named_in_report(tmp_path):
    model = _quantized("w4g32-asym")
    layer = quantized_linears(model)["model.layers.1.self_attn.o_proj"]
    qt = layer.qweight
    zp = qt.zero_point.clone()
    zp[3, 1] = 0
    layer.zero_point = zp
    report = export(model, byte_tokenizer(), "gptq", tmp_path / "out")
    assert len(report.lossy) == 1 and "model.layers.1.self_attn.o_proj: 1 groups with zero point 0" in report.lossy[0]


# -- folders written by other tools ----------------------------------------------------------------


def _autogptq_words(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack (L, C) codes along L as AutoGPTQ does: one big little-endian integer per column,
    cut into 32-bit words (the same bits as its per-word loop, 3-bit straddling included)."""
    out = np.zeros((q.shape[0] * bits // 32, q.shape[1]), dtype=np.uint32)
    for c in range(q.shape[1]):
        big = sum(int(v) << (bits * i) for i, v in enumerate(q[:, c]))
        out[:, c] = [(big >> (32 * j)) & 0xFFFFFFFF for j in range(out.shape[0])]
    return out.view(np.int32)


def _write_foreign(folder, model, layers_tensors, quantization_config):
    folder.mkdir()
    tensors = {k: v for k, v in float_tensors(model).items()}
    tensors.update(layers_tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("checkpoint_format, bits", [("gptq", 4), ("gptq_v2", 3), ("gptq", 2)])
def test_gptq_reads_folders_packed_by_another_writer(tmp_path, checkpoint_format, bits):
    model = _quantized(f"w{bits}g32-asym")
    offset = 1 if checkpoint_format == "gptq" else 0
    stored = {}
    for name, layer in quantized_linears(model).items():
        qt = layer.qweight
        zeros = qt.zero_point.numpy().astype(np.int64)
        if offset:  # keep the test clear of the v1 zero-point-0 loss
            zeros = np.maximum(zeros, 1)
            layer.zero_point = torch.from_numpy(zeros).to(torch.uint8)
            qt = layer.qweight
        q = qt.codes().numpy().astype(np.int64).T
        stored[f"{name}.qweight"] = torch.from_numpy(_autogptq_words(q, bits))
        stored[f"{name}.qzeros"] = torch.from_numpy(_autogptq_words(zeros - offset, bits).T.copy())
        stored[f"{name}.scales"] = qt.scale.T.contiguous()
        stored[f"{name}.g_idx"] = torch.arange(qt.shape[1], dtype=torch.int32) // 32
    config = {"quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": False, "sym": False,
              "checkpoint_format": checkpoint_format, "damp_percent": 0.01, "static_groups": False,
              "true_sequential": True, "lm_head": False, "meta": {"quantizer": ["gptqmodel:2.0.0"]}}
    _write_foreign(tmp_path / "foreign", model, stored, config)
    back, _, name = read_checkpoint(tmp_path / "foreign")
    assert name == "gptq"
    _assert_same_layers(model, back)


def test_awq_reads_folders_packed_by_another_writer(tmp_path):
    model = _quantized("w4g32-asym")
    stored = {}
    for name, layer in quantized_linears(model).items():
        qt = layer.qweight
        q, z = qt.codes().numpy().astype(np.int64).T, qt.zero_point.numpy().astype(np.int64).T
        def awq_words(c):  # AutoAWQ's loop: nibble i of word j <- column 8 j + order_map[i]
            out = np.zeros((c.shape[0], c.shape[1] // 8), dtype=np.uint32)
            for j in range(out.shape[1]):
                for i, col in enumerate(AWQ_ORDER):
                    out[:, j] |= (c[:, 8 * j + col] << (4 * i)).astype(np.uint32)
            return torch.from_numpy(out.view(np.int32))
        stored.update({f"{name}.qweight": awq_words(q), f"{name}.qzeros": awq_words(z),
                       f"{name}.scales": qt.scale.T.contiguous()})
    config = {"quant_method": "awq", "zero_point": True, "group_size": 32, "bits": 4, "version": "gemm",
              "modules_to_not_convert": None}
    _write_foreign(tmp_path / "foreign", model, stored, config)
    back, _, _ = read_checkpoint(tmp_path / "foreign")
    _assert_same_layers(model, back)


def test_readers_recognize_only_their_layout(tmp_path):
    model = _quantized("w4g32-asym")
    export(model, byte_tokenizer(), "gptq", tmp_path / "g")
    export(model, byte_tokenizer(), "awq", tmp_path / "a")
    gptq_x, awq_x = EXPORTERS.get("gptq"), EXPORTERS.get("awq")
    assert gptq_x.recognizes(tmp_path / "g") and not gptq_x.recognizes(tmp_path / "a")
    assert awq_x.recognizes(tmp_path / "a") and not awq_x.recognizes(tmp_path / "g")
    tiny_model().save_pretrained(tmp_path / "float")
    assert not gptq_x.recognizes(tmp_path / "float") and not awq_x.recognizes(tmp_path / "float")


def test_read_refuses_a_corrupt_layer(tmp_path):
    model = _quantized("w4g32")
    export(model, byte_tokenizer(), "gptq", tmp_path / "out")
    tensors, _ = _files(tmp_path / "out")
    tensors["model.layers.0.mlp.up_proj.scales"] = tensors["model.layers.0.mlp.up_proj.scales"][:1]
    save_file(tensors, str(tmp_path / "out" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"up_proj\.scales is float16 \[1, 160\], the layout needs \[2, 160\]"):
        read_checkpoint(tmp_path / "out")


def test_transformers_parses_both_configs(tmp_path):
    from transformers.utils.quantization_config import AwqConfig, GPTQConfig as HFGPTQConfig

    model = _quantized("w4g32")
    export(model, byte_tokenizer(), "gptq", tmp_path / "g")
    export(model, byte_tokenizer(), "awq", tmp_path / "a")
    g = HFGPTQConfig.from_dict(_files(tmp_path / "g")[1]["quantization_config"])
    assert (g.bits, g.group_size, g.sym, g.desc_act, g.format) == (4, 32, True, False, "gptq")
    a = AwqConfig.from_dict(_files(tmp_path / "a")[1]["quantization_config"])
    assert (a.bits, a.group_size, a.zero_point, a.format) == (4, 32, True, "gemm")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["gptq", "awq"])
def test_transformers_loads_the_folder(tmp_path, target):
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    model = _quantized("w4g32-asym")
    export(model, byte_tokenizer(), target, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float16)
    ids = torch.randint(0, 259, (1, 16))
    with torch.no_grad():
        # the reader computes in float16; lowbit's dequantized weights in float32
        torch.testing.assert_close(loaded(ids).logits.float(), model(ids).logits, rtol=0, atol=5e-2)


# -- refusals ------------------------------------------------------------------------------------


def _refusal(target, qt):
    return EXPORTERS.get(target).supports(qt, None)


@pytest.mark.parametrize("target, scheme, message", [
    ("gptq", "nf4g64", "nf4 is a lookup format and GPTQ stores integer codes: quantize with w4g64 "
                       "(or write it with --format bitsandbytes)"),
    ("gptq", "w5g32", "GPTQ stores 2, 3, 4 or 8-bit codes, not 5-bit: quantize with w4g32 or w8g32"),
    ("gptq", "fp8_e4m3", "GPTQ stores integer codes, not fp8_e4m3: write it with --format compressed-tensors"),
    ("gptq", "w4b16x16", "GPTQ keeps one scale per output row and group of input columns, not 16x16 "
                         "blocks: quantize with w4g16"),
    ("awq", "w3g32-asym", "AWQ stores 4-bit codes only; use w4g32-asym or --format gptq"),
    ("awq", "w4g48-asym", "AWQ needs groups that divide the 128 input columns, not groups of 48: quantize "
                          "with a group size dividing 128 (e.g. w4g32-asym) or use --format gptq"),
])
def test_formats_refuse_what_they_cannot_hold(target, scheme, message):
    qt = quantize_tensor(torch.randn(32, 128), parse_args(scheme))
    assert _refusal(target, qt) == message


def test_gptq_refuses_float_zero_points_and_unaligned_columns():
    qt = _qt(torch.zeros(32, 64, dtype=torch.uint8), torch.ones(32, 2, dtype=torch.float16),
             torch.full((32, 2), 7.5, dtype=torch.float16), "uint4", 32)
    assert _refusal("gptq", qt).startswith("float zero points (HQQ) do not fit GPTQ's integer qzeros: "
                                           "quantize with --method rtn or gptq (w4g32-asym")
    assert _refusal("awq", qt).startswith("float zero points (HQQ) do not fit AWQ's")
    odd = quantize_tensor(torch.randn(32, 36), parse_args("w3"))
    assert "36 input columns do not fill whole int32 words of 3-bit codes (GPTQ needs a multiple of 32)" in (
        _refusal("gptq", odd))


def test_awq_refuses_act_order_and_per_channel(tmp_path):
    model = _quantized("w4g32")
    qt = _act_order_layer(model)
    assert _refusal("awq", qt).startswith("act-order groups (group_index) do not fit AWQ")
    with pytest.raises(ExportError, match="cannot write model.layers.0.mlp.down_proj as awq: act-order"):
        export(model, byte_tokenizer(), "awq", tmp_path / "a")
    with pytest.raises(ExportError, match="AWQ stores one group size per model and per-channel scales give "
                                          "each layer its own: quantize with groups"):
        export(_quantized("w4-asym"), byte_tokenizer(), "awq", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_gptq_refuses_mixed_schemes_and_quantized_activations(tmp_path):
    mixed = _quantized("w4g32", overrides=(("re:.*down_proj", "w8g32"),))
    with pytest.raises(ExportError, match="GPTQ stores one bit width and symmetry per model; these layers mix "
                                          "4-bit sym, 8-bit sym"):
        export(mixed, byte_tokenizer(), "gptq", tmp_path / "m")
    groups = _quantized("w4g32", overrides=(("re:.*down_proj", "w4g16"),))
    with pytest.raises(ExportError, match="GPTQ stores one group size per model; these layers use groups of 16, 32"):
        export(groups, byte_tokenizer(), "gptq", tmp_path / "g")
    acts = _quantized("W8A8")
    with pytest.raises(ExportError, match="GPTQ is weight-only and model.layers.0.self_attn.q_proj quantizes "
                                          "activations"):
        export(acts, byte_tokenizer(), "gptq", tmp_path / "a")


def test_float_linears_are_named_for_the_readers(tmp_path):
    model = _quantized("w4g32", ignore=("lm_head", "re:.*down_proj"))
    export(model, byte_tokenizer(), "gptq", tmp_path / "g")
    export(model, byte_tokenizer(), "awq", tmp_path / "a")
    gq = _files(tmp_path / "g")[1]["quantization_config"]
    assert gq["lm_head"] is False
    assert gq["dynamic"] == {r"-:^model\.layers\.0\.mlp\.down_proj$": {}, r"-:^model\.layers\.1\.mlp\.down_proj$": {}}
    aq = _files(tmp_path / "a")[1]["quantization_config"]
    assert aq["modules_to_not_convert"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    for folder in ("g", "a"):
        back, _, _ = read_checkpoint(tmp_path / folder)
        assert isinstance(back.get_submodule("model.layers.1.mlp.down_proj"), torch.nn.Linear)
        _same_logits(model, back)
