"""The bitsandbytes exporter and reader: golden bytes, round trips, refusals, and transformers +
bitsandbytes as the real reader (CPU) in both directions."""

import copy
import json

import pytest
import torch

from lowbit.core import parse_args, quantize as quantize_tensor
from lowbit.core.formats import NF4_LEVELS, get_format
from lowbit.core.tensor import QuantizedTensor
from lowbit.export import EXPORTERS, ExportError, export, read_checkpoint
from lowbit.export.bitsandbytes import (
    from_bnb_4bit,
    from_bnb_int8,
    pack_4bit,
    to_bnb_4bit,
    to_bnb_int8,
    unpack_4bit,
    unsupported_reason,
)
from lowbit.models.tiny import byte_tokenizer, tiny_model
from lowbit.quantize import quantize
from lowbit.recipe import Recipe

EXPORTER = EXPORTERS.get("bitsandbytes")
NF4 = get_format("nf4")


def nf4_weight(codes, scale, group):
    codes = torch.tensor(codes, dtype=torch.uint8)
    return QuantizedTensor.from_codes(codes, torch.tensor(scale, dtype=torch.float16), None, NF4,
                                      (1, group), torch.float32)


def quantized_tiny(scheme="nf4", **recipe):
    """A 2-layer Llama whose inputs (64, 128) are multiples of bitsandbytes' blocks of 64."""
    model = tiny_model("llama", seed=0, intermediate_size=128)
    quantize(model, Recipe(scheme=scheme, **recipe), progress=False)
    return model


IDS = torch.tensor([[1, 40, 77, 3, 200, 150, 9, 31, 58, 120, 250, 4, 66, 90, 14, 2]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# -- golden bytes, worked out by hand from the layout in the module docstring --------------------


def test_golden_nf4_bytes():
    # Row 0 starts with codes 1, 2, 3, 4; row 1 with 15, 0, 7, 8; the rest are code 0.
    # Flattened, two codes per byte, the first in the high nibble:
    # 0x12 = 18, 0x34 = 52, ... row 1 begins at byte 16: 0xF0 = 240, 0x78 = 120.
    codes = [[1, 2, 3, 4] + [0] * 28, [15, 0, 7, 8] + [0] * 28]
    qt = nf4_weight(codes, [[0.5], [2.0]], 32)
    out = to_bnb_4bit(qt)
    expected = [18, 52] + [0] * 14 + [240, 120] + [0] * 14
    assert out["weight"].dtype == torch.uint8 and out["weight"].shape == (32, 1)
    assert out["weight"].reshape(-1).tolist() == expected
    assert out["weight.absmax"].dtype == torch.float32
    assert out["weight.absmax"].tolist() == [0.5, 2.0]
    assert out["weight.quant_map"].tolist() == list(NF4_LEVELS)
    state = bytes(out["weight.quant_state.bitsandbytes__nf4"].tolist()).decode()
    assert state == '{"quant_type": "nf4", "blocksize": 32, "dtype": "float32", "shape": [2, 32]}'


def test_golden_pack_odd_count_pads_the_low_nibble():
    assert pack_4bit(torch.tensor([1, 2, 3])).reshape(-1).tolist() == [0x12, 0x30]
    assert unpack_4bit(torch.tensor([[0x12], [0x30]], dtype=torch.uint8), 3).tolist() == [1, 2, 3]


def test_golden_int8_bytes():
    codes = torch.tensor([[-1, 2, 127, -128]], dtype=torch.int8)
    qt = QuantizedTensor.from_codes(codes, torch.tensor([[0.5]], dtype=torch.float16), None,
                                    get_format("int8"), (1, 4), torch.float32)
    out = to_bnb_int8(qt)
    assert out["weight"].dtype == torch.int8 and out["weight"].tolist() == [[-1, 2, 127, -128]]
    assert out["SCB"].dtype == torch.float32 and out["SCB"].tolist() == [63.5]  # 0.5 * 127
    assert out["weight_format"].item() == 0


# -- round trips of the pure functions ------------------------------------------------------------


@pytest.mark.parametrize("scheme,shape", [("nf4", (48, 128)), ("nf4g32", (8, 96)), ("nf4g64", (3, 64)),
                                          ("w8", (16, 40))])
def test_round_trip_is_identical(scheme, shape):
    w = torch.randn(shape)
    qt = quantize_tensor(w, parse_args(scheme))
    back = from_bnb_4bit(to_bnb_4bit(qt)) if scheme != "w8" else from_bnb_int8(to_bnb_int8(qt))
    assert torch.equal(back.codes(), qt.codes())
    assert back.scale.dtype == qt.scale.dtype and torch.equal(back.scale, qt.scale)
    assert back.block_size == qt.block_size and back.format == qt.format
    assert torch.equal(back.dequantize(torch.float32), qt.dequantize(torch.float32))


def test_per_channel_nf4_is_one_block_per_row():
    qt = quantize_tensor(torch.randn(4, 64), parse_args("nf4g64").with_(granularity="channel", group_size=None))
    assert qt.block_size == (1, 64) and unsupported_reason(qt) is None
    assert json.loads(bytes(to_bnb_4bit(qt)["weight.quant_state.bitsandbytes__nf4"].tolist()))["blocksize"] == 64


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme,shape,fix", [
    ("nf4", (8, 160), "use --scheme nf4g32"),
    ("nf4g64", (8, 96), "use --scheme nf4g32"),
    ("nf4g16", (8, 64), "use --scheme nf4g32"),
    ("nf4g32", (8, 30), "keep this layer in float (--ignore)"),
    ("fp4", (8, 64), "use --scheme nf4"),
    ("w4g128", (8, 256), "use --format compressed-tensors for int4 groups"),
    ("w4g64-asym", (8, 256), "use --format compressed-tensors for int4 groups"),
    ("w8g32", (8, 64), "use --scheme w8"),
    ("w8-asym", (8, 64), "use --format compressed-tensors"),
    ("fp8_e4m3", (8, 64), "use --format compressed-tensors"),
    ("iq4_nl", (8, 64), "use --scheme nf4"),
    ("q4_k", (8, 256), "use --format gguf"),
])
def test_refusals_name_a_scheme_that_works(scheme, shape, fix):
    reason = unsupported_reason(quantize_tensor(torch.randn(shape), parse_args(scheme)))
    assert reason is not None and "\n" not in reason and fix in reason, reason


def test_refuses_act_order_and_mixed_bits(tmp_path):
    qt = quantize_tensor(torch.randn(8, 64), parse_args("w8"))
    qt.group_index = torch.zeros(64, dtype=torch.int32)
    assert "act-order" in unsupported_reason(qt)
    model = quantized_tiny("nf4", overrides=(("re:.*down_proj", "w8"),))
    with pytest.raises(ExportError, match="either in 4 bits or in 8 bits"):
        export(model, None, "bitsandbytes", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="takes no variant"):
        export(model, None, "bitsandbytes:nf4", tmp_path / "out")


# -- lowbit's own round trip through a folder ------------------------------------------------------


@pytest.mark.parametrize("scheme", ["nf4", "w8"])
def test_export_then_read_gives_the_same_model(tmp_path, scheme):
    model = quantized_tiny(scheme)
    report = export(model, byte_tokenizer(), "bitsandbytes", tmp_path / "bnb")
    # nf4: 4 bits + a float32 absmax per 64; int8: 8 bits + a float32 SCB per row of 64 or 128
    # inputs (28672 weights in rows of 64, 8192 in rows of 128)
    bits = 4.5 if scheme == "nf4" else 8 + (28672 * 32 / 64 + 8192 * 32 / 128) / 36864
    assert report.bits_per_weight == pytest.approx(bits, rel=1e-12)
    config = json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["llm_int8_skip_modules"] == ["lm_head"]
    assert config["load_in_4bit"] is (scheme == "nf4") and config["load_in_8bit"] is (scheme == "w8")
    assert EXPORTER.recognizes(tmp_path / "bnb")
    back, tokenizer, name = read_checkpoint(tmp_path / "bnb")
    assert name == "bitsandbytes" and tokenizer is not None
    for layer_name, layer in model.named_modules():
        if hasattr(layer, "qweight"):
            got = back.get_submodule(layer_name).qweight
            assert torch.equal(got.codes(), layer.qweight.codes())
            assert torch.equal(got.scale, layer.qweight.scale)
    assert torch.equal(logits(back), logits(model))


def test_read_refuses_a_damaged_quant_state(tmp_path):
    from safetensors.torch import load_file, save_file

    export(quantized_tiny(), None, "bitsandbytes", tmp_path / "bnb")
    file = tmp_path / "bnb" / "model.safetensors"
    tensors = load_file(file)
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    tensors[key] = tensors[key][:-3]
    save_file(tensors, file)
    with pytest.raises(ExportError, match="up_proj: its quant_state is not bitsandbytes' JSON"):
        read_checkpoint(tmp_path / "bnb")


# -- the real reader: transformers + bitsandbytes on CPU -----------------------------------------


def bnb_model(folder, fused_bf16=True, **kwargs):
    """transformers + bitsandbytes' model of ``folder``. On CPUs with AVX512-BF16 bitsandbytes
    computes 4-bit layers in bfloat16 (``fused_bf16``); without it, it dequantizes to the
    compute dtype (float32 here) and calls ``linear``."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **kwargs)
    if not fused_bf16:
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    return model.eval()


def bnb_dequantized(model) -> dict[str, torch.Tensor]:
    """Each bitsandbytes linear's float32 weight as bitsandbytes dequantizes it (call before a
    forward pass, which repacks 4-bit weights for the CPU kernel)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            out[name] = dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        elif isinstance(m, bnb.nn.Linear8bitLt):
            out[name] = int8_vectorwise_dequant(m.weight.data, m.weight.SCB)
    return out


def test_nf4_levels_are_bitsandbytes_table_bit_for_bit():
    functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(functional.get_4bit_type("nf4", device="cpu"), torch.tensor(NF4_LEVELS))
    fp4 = functional.get_4bit_type("fp4", device="cpu")
    assert fp4[1].item() == pytest.approx(1 / 192)  # lowbit's fp4 has 1/12 there: refused


def test_transformers_bitsandbytes_loads_the_nf4_export(tmp_path):
    model = quantized_tiny("nf4", ignore=("lm_head", "model.layers.1.mlp.down_proj"))
    export(model, byte_tokenizer(), "bitsandbytes", tmp_path / "bnb")
    import bitsandbytes as bnb  # noqa: F401  (bnb_model skips when missing)

    exact = bnb_model(tmp_path / "bnb", fused_bf16=False)
    assert type(exact.model.layers[1].mlp.down_proj) is torch.nn.Linear  # llm_int8_skip_modules
    weights = bnb_dequantized(exact)
    assert len(weights) == 13
    for name, w in weights.items():
        assert torch.equal(w, model.get_submodule(name).qweight.dequantize(torch.float32)), name
    reference = logits(model)
    torch.testing.assert_close(logits(exact), reference, rtol=1e-5, atol=1e-5)
    # As transformers loads it: bfloat16 activations and absmax on AVX512-BF16 CPUs.
    torch.testing.assert_close(logits(bnb_model(tmp_path / "bnb")), reference, rtol=0, atol=2e-2)


def test_transformers_bitsandbytes_loads_the_int8_export(tmp_path):
    model = quantized_tiny("w8")
    export(model, byte_tokenizer(), "bitsandbytes", tmp_path / "bnb")
    loaded = bnb_model(tmp_path / "bnb")
    layer = loaded.model.layers[0].mlp.down_proj
    ours = model.model.layers[0].mlp.down_proj.qweight
    assert torch.equal(layer.weight.data, ours.codes())
    assert torch.equal(layer.weight.SCB, ours.scale.float().reshape(-1) * 127)
    weights = bnb_dequantized(loaded)
    assert len(weights) == 14
    for name, w in weights.items():  # bitsandbytes rounds code * SCB, then * (1 / 127): an ulp or two
        ours = model.get_submodule(name).qweight.dequantize(torch.float32)
        torch.testing.assert_close(w, ours, rtol=2.5e-7, atol=0)
    # LLM.int8 also quantizes activations to int8 (per token), which lowbit's w8 does not.
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=5e-2)


@pytest.mark.parametrize("double_quant", [False, True])
def test_reads_a_4bit_folder_written_by_transformers(tmp_path, double_quant):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    float_model = tiny_model("llama", seed=0, intermediate_size=128)
    float_model.save_pretrained(tmp_path / "float")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=double_quant)
    theirs = bnb_model(tmp_path / "float", quantization_config=config)
    theirs.save_pretrained(tmp_path / "bnb")
    expected = bnb_dequantized(theirs)
    ours, _, name = read_checkpoint(tmp_path / "bnb")
    assert name == "bitsandbytes" and len(expected) == 14
    for layer, w in expected.items():
        qt = ours.get_submodule(layer).qweight
        assert qt.format.name == "nf4" and qt.block_size == (1, 64)
        assert torch.equal(qt.dequantize(torch.float32), w), layer
    torch.testing.assert_close(logits(ours), logits(bnb_model(tmp_path / "bnb", fused_bf16=False)),
                               rtol=1e-5, atol=1e-5)


def test_reads_an_int8_folder_written_by_transformers(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    tiny_model("llama", seed=0, intermediate_size=128).save_pretrained(tmp_path / "float")
    theirs = bnb_model(tmp_path / "float", quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    theirs.save_pretrained(tmp_path / "bnb")
    expected = bnb_dequantized(theirs)
    ours, _, _ = read_checkpoint(tmp_path / "bnb")
    for layer, w in expected.items():
        qt = ours.get_submodule(layer).qweight
        assert torch.equal(qt.codes(), theirs.get_submodule(layer).weight.data)
        # lowbit's scale is SCB / 127 rounded once; bitsandbytes rounds code * SCB, then * (1 / 127)
        torch.testing.assert_close(qt.dequantize(torch.float32), w, rtol=2.5e-7, atol=0)


def test_refuses_a_bitsandbytes_fp4_folder(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    tiny_model("llama", seed=0, intermediate_size=128).save_pretrained(tmp_path / "float")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")
    bnb_model(tmp_path / "float", quantization_config=config).save_pretrained(tmp_path / "bnb")
    with pytest.raises(ExportError, match="is bitsandbytes fp4, whose levels lowbit has no format for"):
        read_checkpoint(tmp_path / "bnb")


# -- the bundled model (slow) ----------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_nf4_export_matches_in_transformers_bitsandbytes(tmp_path):
    from lowbit.data.calibration import evaluation_tokens
    from lowbit.eval.metrics import compare_models
    from lowbit.models.load import load_model

    model, tokenizer = load_model("smollm2-135m")
    quantized = copy.deepcopy(model)
    quantize(quantized, Recipe(scheme="nf4", method="rtn"), progress=False)
    export(quantized, tokenizer, "bitsandbytes", tmp_path / "bnb")
    tokens = evaluation_tokens(tokenizer, max_tokens=512)
    exact = compare_models(bnb_model(tmp_path / "bnb", fused_bf16=False), quantized, tokens,
                           window=256, progress=False)
    fused = compare_models(bnb_model(tmp_path / "bnb"), quantized, tokens, window=256, progress=False)
    print(f"smollm2-135m nf4 rtn, bitsandbytes vs lowbit over {exact.num_scored} tokens: mean KL "
          f"{exact.mean_kl:.2e} (float32 path), {fused.mean_kl:.2e} (CPU bfloat16 kernel)")
    assert exact.mean_kl < 1e-5 and exact.top1_agreement > 0.99
    assert fused.mean_kl < 1e-2
