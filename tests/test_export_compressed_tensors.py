"""compressed-tensors export: hand-computed words, round trips, refusals, and the real readers
(transformers + compressed-tensors) on folders written by lowbit and by compressed-tensors."""

import json
import warnings

import pytest
import torch

from lowbit.core.formats import get_format
from lowbit.core.tensor import QuantizedTensor
from lowbit.export import ExportError, export
from lowbit.export.base import EXPORTERS, read_checkpoint
from lowbit.export.compressed_tensors import from_compressed, pack_int32, to_compressed, unpack_int32, weight_args
from lowbit.models.tiny import tiny_model
from lowbit.quantize import quantize
from lowbit.recipe import Recipe

EXPORTER = EXPORTERS.get("compressed-tensors")


def _qt(codes, scale, zero=None, fmt="int4", block=None, index=None):
    codes = torch.tensor(codes)
    block = block or (1, codes.shape[1])
    fmt = get_format(fmt)
    return QuantizedTensor.from_codes(codes.to(fmt.code_dtype), torch.tensor(scale, dtype=torch.float16),
                                      None if zero is None else torch.tensor(zero, dtype=torch.uint8),
                                      fmt, block, torch.float32, index)


# -- tier 1: words worked out by hand from the published layout -------------------------------


def test_pack_int32_words_by_hand():
    # 4 bits: code k in bits 4k..4k+3 of the word, code 0 lowest: 0x87654321 as int32.
    four = pack_int32(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0]]), 4)
    assert four.dtype == torch.int32
    assert four.tolist() == [[0x87654321 - 2**32, 0x0FEDCBA9]]
    # 8 bits: four codes per word, 0xFF030201.
    assert pack_int32(torch.tensor([[1, 2, 3, 255]]), 8).tolist() == [[0xFF030201 - 2**32]]
    # 2 bits: 3 | 0 << 2 | 1 << 4 | 2 << 6 = 147; a short row is padded with zeros.
    assert pack_int32(torch.tensor([[3, 0, 1, 2]]), 2).tolist() == [[147]]
    # 3 bits: eleven 7s are 33 one-bits; the 11th code straddles into bit 0 of word 1.
    assert pack_int32(torch.full((1, 11), 7), 3).tolist() == [[-1, 1]]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_unpack_inverts_pack_and_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 2**bits, (5, 77))
    words = pack_int32(codes, bits)
    assert torch.equal(unpack_int32(words, bits, 77), codes.to(torch.int16))
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(words, pack_to_int32(signed, bits))
    assert torch.equal(words.T, pack_to_int32(signed.T.contiguous(), bits, packed_dim=0))


def test_to_compressed_by_hand_symmetric_and_asymmetric():
    # Symmetric int4: signed codes -8, -1, 0, 7 are stored as 0, 7, 8, 15.
    sym = to_compressed(_qt([[-8, -1, 0, 7, 0, 0, 0, 0]], [[0.5]]))
    assert sym["weight_packed"].tolist() == [[0x8888F870 - 2**32]]
    assert sym["weight_shape"].tolist() == [1, 8] and "weight_zero_point" not in sym
    assert sym["weight_scale"].shape == (1, 1) and sym["weight_scale"].dtype == torch.float32
    # Asymmetric uint4 per channel, row r all r, zero point r: codes and zero points keep their
    # unsigned values (c - 8 + 8); zero points are packed down the rows (dim 0).
    asym = to_compressed(_qt([[r] * 8 for r in range(8)], [[1.0]] * 8, [[r] for r in range(8)], "uint4"))
    assert asym["weight_packed"][:, 0].tolist() == [r * 0x11111111 for r in range(8)]
    assert asym["weight_zero_point"].tolist() == [[0x76543210]]
    assert asym["weight_zero_point"].dtype == torch.int32
    # Groups of 4: a (2, 8) weight has scales (2, 2) and a (1, 2) packed zero point.
    grouped = to_compressed(_qt([[15] * 8, [0] * 8], [[1, 2], [3, 4]], [[1, 2], [3, 4]], "uint4", (1, 4)))
    assert grouped["weight_zero_point"].tolist() == [[0x31, 0x42]]
    assert weight_args(_qt([[1] * 8], [[1, 1]], block=(1, 4)))["group_size"] == 4


def test_from_compressed_inverts_to_compressed_with_act_order_index():
    index = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0], dtype=torch.int32)
    q = _qt([[3, 4, 5, 6, 7, 8, 9, 10], [0, 1, 2, 3, 4, 5, 6, 15]], [[1, 2], [3, 4]], [[8, 9], [7, 6]],
            "uint4", (1, 4), index)
    back = from_compressed(to_compressed(q), weight_args(q))
    assert back.format.name == "uint4" and torch.equal(back.codes(), q.codes())
    assert torch.equal(back.group_index, index) and torch.equal(back.zero_point, q.zero_point)
    assert torch.equal(back.dequantize(), q.dequantize())


# -- round trip through a folder ------------------------------------------------------------


SCHEMES = ["w4g32", "w4g32-asym", "w8", "w8-asym", "w2g16", "w4-tensor-asym", "fp8_e4m3", "fp8_e4m3-tensor"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_gives_identical_codes_scales_and_logits(tmp_path, tokenizer, scheme):
    model = tiny_model(seed=2)
    quantize(model, Recipe(scheme=scheme), progress=False)
    report = export(model, tokenizer, "compressed-tensors", tmp_path / "ct")
    assert EXPORTER.recognizes(tmp_path / "ct")
    again, tok, name = read_checkpoint(tmp_path / "ct")
    assert name == "compressed-tensors" and tok("ab")["input_ids"] == tokenizer("ab")["input_ids"]
    before, after = dict(model.named_modules()), dict(again.named_modules())
    for layer in report.layers:
        q, r = before[layer].qweight, after[layer].qweight
        assert (r.format, r.block_size, r.shape) == (q.format, q.block_size, q.shape)
        assert torch.equal(r.codes(), q.codes())
        assert torch.equal(r.scale.float(), q.scale.float())
        assert (r.zero_point is None) == (q.zero_point is None)
        if q.zero_point is not None:
            assert torch.equal(r.zero_point, q.zero_point)
        assert torch.equal(r.dequantize(torch.float32), q.dequantize(torch.float32))
    ids = torch.randint(0, 259, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_config_groups_targets_ignore_and_report(tmp_path):
    model = tiny_model(seed=3)
    quantize(model, Recipe(scheme="w4g32", overrides=(("re:.*mlp.*", "w8"),)), progress=False)
    report = export(model, None, "compressed-tensors", tmp_path / "mixed")
    qc = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == (
        "compressed-tensors", "pack-quantized", "compressed")
    assert qc["ignore"] == ["lm_head"]
    groups = {g["weights"]["num_bits"]: g for g in qc["config_groups"].values()}
    assert groups[4]["weights"] == {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 32,
                                    "strategy": "group", "dynamic": False}
    assert groups[8]["weights"]["strategy"] == "channel"
    assert "model.layers.1.mlp.down_proj" in groups[8]["targets"]
    assert "model.layers.0.self_attn.q_proj" in groups[4]["targets"]
    assert report.layers["model.layers.0.mlp.up_proj"] == "pack-quantized int8 channel symmetric"
    # int4 groups of 32 with float32 scales (the model's dtype): 4 + 32/32 bits, int8 8 + 32/K.
    assert 4.9 < report.bits_per_weight < 8.3
    single = tiny_model(seed=3)
    quantize(single, Recipe(scheme="w4g32"), progress=False)
    export(single, None, "compressed-tensors", tmp_path / "one")
    qc = json.loads((tmp_path / "one" / "config.json").read_text())["quantization_config"]
    assert [g["targets"] for g in qc["config_groups"].values()] == [["Linear"]]


# -- refusals -----------------------------------------------------------------------------


def _refusal(qweight):
    return EXPORTER.supports(qweight, None)


def test_refusals_name_the_nearest_scheme_that_works():
    codes = [[1] * 8] * 2
    assert _refusal(_qt(codes, [[1]] * 2, fmt="nf4")).endswith("use --format bitsandbytes")
    hqq = _qt(codes, [[1]] * 2, [[1]] * 2, "uint4")
    hqq.zero_point = torch.full((2, 1), 7.5, dtype=torch.float16)
    assert "quantize with rtn/gptq/awq or a symmetric scheme" in _refusal(hqq)
    assert "use a group scheme such as w4g128" in _refusal(_qt([[1] * 8] * 4, [[1]] * 2, block=(2, 8)))
    assert "use w4g128 or w8" in _refusal(_qt(codes, [[1]] * 2, fmt="int3"))
    act_order = _qt(codes, [[1, 1]] * 2, block=(1, 4), index=torch.tensor([0, 1] * 4, dtype=torch.int32))
    assert "static_groups" in _refusal(act_order)
    fp8_group = QuantizedTensor.from_codes(torch.ones(2, 8).to(torch.float8_e4m3fn), torch.ones(2, 2),
                                           None, get_format("fp8_e4m3"), (1, 4), torch.float32)
    assert "use fp8_e4m3 (per channel)" in _refusal(fp8_group)
    assert _refusal(_qt(codes, [[1]] * 2)) is None


def test_ragged_groups_are_refused_because_compressed_tensors_cannot_dequantize_them():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    ragged = _qt([[1] * 576], [[1] * 5], block=(1, 128))
    assert _refusal(ragged) == ("group 128 does not divide 576 input columns; use a group that "
                                "divides them, e.g. w4g64 or w4g32")
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=128)
    with pytest.raises(ValueError, match="divisble|divisible"):  # the reader's own check
        dequantize(torch.ones(1, 576, dtype=torch.int8), torch.ones(1, 5), None, args)


def test_export_errors_are_one_line(tmp_path):
    model = tiny_model(seed=4)
    quantize(model, Recipe(scheme="nf4"), progress=False)
    with pytest.raises(ExportError, match=r"^cannot write model\.layers\.0\.self_attn\.q_proj as "
                                          r"compressed-tensors \(and 13 more layers\): .*bitsandbytes$"):
        export(model, None, "compressed-tensors", tmp_path / "x")
    activations = tiny_model(seed=4)
    quantize(activations, Recipe(scheme="W8A8"), progress=False)
    with pytest.raises(ExportError, match="quantizes activations .* weight-only scheme"):
        export(activations, None, "compressed-tensors", tmp_path / "y")
    with pytest.raises(ExportError, match="takes no variant"):
        export(activations, None, "compressed-tensors:x", tmp_path / "z")


# -- the real reader: transformers + compressed-tensors ------------------------------------


def _hf_load(folder, dequantize=False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    with warnings.catch_warnings():  # "the quantization_config from the model will be used"
        warnings.filterwarnings("ignore", "You passed `quantization_config`", UserWarning)
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


@pytest.mark.parametrize("scheme, overrides, dequantize", [
    ("w4g32", (("re:.*mlp.*", "w8"),), False),  # two config groups, compressed on load
    ("w4g32-asym", (), True),  # asymmetric: see the docs (packed zero points)
    ("fp8_e4m3", (), False),
])
def test_transformers_loads_the_folder_and_matches_lowbit(tmp_path, scheme, overrides, dequantize):
    model = tiny_model(seed=5)
    quantize(model, Recipe(scheme=scheme, overrides=overrides), progress=False)
    export(model, None, "compressed-tensors", tmp_path / "ct")
    theirs = _hf_load(tmp_path / "ct", dequantize)
    ids = torch.randint(0, 259, (2, 16))
    with torch.no_grad():
        ours, hf = model(ids).logits, theirs(ids).logits
    torch.testing.assert_close(hf, ours, rtol=1e-5, atol=1e-6)


def test_quantized_lm_head_of_a_tied_model_is_written_untied(tmp_path, tokenizer):
    model = tiny_model(seed=7, tie_word_embeddings=True)
    quantize(model, Recipe(scheme="w4g32", ignore=()), progress=False)
    export(model, tokenizer, "compressed-tensors", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["quantization_config"]["ignore"] == []
    ours, _, _ = read_checkpoint(tmp_path / "ct")
    ids = torch.randint(0, 259, (1, 12))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(ours(ids).logits, expected)
        assert torch.equal(_hf_load(tmp_path / "ct")(ids).logits, expected)


def _compressed_tensors_folder(folder, symmetric: bool):
    """A tiny Llama written by compressed-tensors' own compressor (group 32 int4)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    model = tiny_model(seed=6)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=32)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(model, config, show_progress=False)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.data.reshape(module.weight.shape[0], -1, 32)
            if symmetric:
                module.weight_scale.data = w.abs().amax(-1) / 7.5
            else:
                lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
                module.weight_scale.data = (hi - lo) / 15
                zero = torch.round(-lo / module.weight_scale.data) - 8
                module.weight_zero_point.data = zero.clamp(-8, 7).to(torch.int8)
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)


@pytest.mark.parametrize("symmetric", [True, False])
def test_read_folders_written_by_compressed_tensors(tmp_path, symmetric):
    _compressed_tensors_folder(tmp_path / "theirs", symmetric)
    ours, _ = EXPORTER.read(tmp_path / "theirs")
    theirs = _hf_load(tmp_path / "theirs", dequantize=not symmetric)
    ids = torch.randint(0, 259, (1, 8))
    with torch.no_grad():
        ours_logits, their_logits = ours(ids).logits, theirs(ids).logits  # decompresses theirs
    linears = {n: m for n, m in ours.named_modules() if hasattr(m, "qweight")}
    assert len(linears) == 14
    for name, layer in linears.items():
        assert layer.qweight.format.name == ("int4" if symmetric else "uint4")
        assert torch.equal(layer.qweight.dequantize(torch.float32), theirs.get_submodule(name).weight)
    assert torch.equal(ours_logits, their_logits)


def test_recognizes_only_compressed_tensors_folders(tmp_path):
    assert not EXPORTER.recognizes(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    assert not EXPORTER.recognizes(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert not EXPORTER.recognizes(tmp_path)


# -- the real model -------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gptq_w4g64_matches_transformers(tmp_path):
    from lowbit.data.calibration import CalibrationSpec, calibration_tokens, evaluation_tokens
    from lowbit.eval.metrics import compare_models
    from lowbit.models.load import load_model

    model, tokenizer = load_model("smollm2-135m")
    calibration = calibration_tokens(CalibrationSpec(num_samples=16, seq_len=256), tokenizer)
    quantize(model, Recipe(scheme="w4g64", method="gptq"), calibration, progress=False)
    export(model, tokenizer, "compressed-tensors", tmp_path / "ct")
    theirs = _hf_load(tmp_path / "ct")
    report = compare_models(theirs, model, evaluation_tokens(tokenizer, max_tokens=512), window=512,
                            progress=False)
    print(f"\ncompressed-tensors smollm2-135m gptq w4g64: {report.to_dict()}")
    assert report.mean_kl <= 1e-4
    assert report.top1_agreement >= 0.999
