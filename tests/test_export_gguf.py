"""GGUF export: llama.cpp's block layouts (golden bytes by hand, and gguf-py's dequantizer as the
reference reader), llama.cpp's per-tensor type rules, and a whole tiny model written and read back."""

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from lowbit.core.args import GGUF_WEIGHT_TYPES, parse_args
from lowbit.core.quantize import quantize
from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import ConfigError, LowbitError
from lowbit.export import ExportError, export
from lowbit.export.gguf import gguf_type_of, rotary_permutation
from lowbit.export.gguf_blocks import PACKERS, _k4_scales, q1_offset_error
from lowbit.export.gguf_types import fit_row, tensor_type, use_more_bits
from lowbit.quantize import quantize as quantize_model
from lowbit.recipe import Recipe

# -- golden bytes, worked out by hand from ggml-common.h ----------------------------------------


def _qt(codes, scale, fmt, zero=None):
    codes = torch.tensor([codes], dtype=torch.int8 if fmt.startswith("int") else torch.uint8)
    args = parse_args({"int8": "q8_0", "int4": "q4_0", "int5": "q5_0"}[fmt])
    return QuantizedTensor.from_codes(codes, torch.tensor([[scale]], dtype=torch.float16), zero,
                                      args.code_format, (1, 32), torch.float32)


def test_q4_0_golden_bytes():
    # codes j - 8 (stored j) for j < 16 and 7 - j (stored 15 - j) after: byte j = j | (15 - j) << 4
    qt = _qt([j - 8 for j in range(16)] + [7 - j for j in range(16)], 0.5, "int4")
    expected = [0x00, 0x38] + [0xF0, 0xE1, 0xD2, 0xC3, 0xB4, 0xA5, 0x96, 0x87,
                               0x78, 0x69, 0x5A, 0x4B, 0x3C, 0x2D, 0x1E, 0x0F]
    assert PACKERS["Q4_0"](qt)[0].tolist() == expected


def test_q5_0_golden_bytes():
    # even columns code 0 (stored 16: bit 4 set), odd columns -16 (stored 0): qh = 0x55555555
    qt = _qt([0 if j % 2 == 0 else -16 for j in range(32)], 1.0, "int5")
    assert PACKERS["Q5_0"](qt)[0].tolist() == [0x00, 0x3C, 0x55, 0x55, 0x55, 0x55] + [0] * 16


def test_q8_0_golden_bytes():
    qt = _qt([-128, 127, 1, -1] + [0] * 28, 2.0, "int8")
    assert PACKERS["Q8_0"](qt)[0].tolist()[:6] == [0x00, 0x40, 0x80, 0x7F, 0x01, 0xFF]


def test_q4_k_scale_bytes():
    sc = torch.tensor([1, 2, 3, 4, 5, 6, 7, 63])
    mc = torch.tensor([0, 0, 0, 0, 16, 32, 48, 63])
    assert _k4_scales(sc, mc).tolist() == [1, 2, 3, 0xC4, 0x40, 0x80, 0xC0, 0xC0, 0x05, 0x06, 0x07, 0xFF]


# -- every type against gguf-py's dequantizer ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(PACKERS))
def test_packed_blocks_dequantize_to_lowbit_values(name):
    w = torch.randn(6, 512) * torch.logspace(-3, 0, 6)[:, None]  # rows of very different ranges
    w[0, :40] = 0  # an all-zero block (and part of another)
    qt = quantize(w, parse_args(name))
    data = PACKERS[name](qt)
    qtype = gguf.GGMLQuantizationType[name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert data.shape == (6, 512 // block * size)
    got = dequantize(data.numpy(), qtype).reshape(6, 512)
    ours = qt.dequantize(torch.float32).numpy()
    if name in ("Q4_1", "Q5_1"):  # the offset m = -z * s is rounded to float16
        assert np.abs(got - ours).max() <= q1_offset_error(qt) + 1e-7
    else:
        assert np.array_equal(got, ours), name


def test_gguf_grids_are_named_and_recognized():
    for name in GGUF_WEIGHT_TYPES:
        qt = quantize(torch.randn(4, 256), parse_args(f"gguf:{name}"))
        assert gguf_type_of(qt) == name
    assert parse_args("q4_k").name() == "q4_k" and parse_args("iq4_nl").name() == "iq4_nl"
    assert parse_args("q8_0").name() == "w8g32"  # the grammar already names it
    assert parse_args("q4_0").name() == "q4_0"  # signed scales: not w4g32
    assert gguf_type_of(quantize(torch.randn(4, 256), parse_args("w4g64"))) is None


def test_signed_scales_put_the_extreme_on_the_longer_side():
    w = torch.tensor([[0.8] + [0.1] * 31, [-0.8] + [0.1] * 31])
    q = quantize(w, parse_args("q4_0"))
    assert q.scale.flatten().tolist() == pytest.approx([-0.1, 0.1], rel=1e-3)  # 0.8 -> code -8
    assert torch.equal(q.dequantize()[:, 0], torch.tensor([0.8, -0.8]).to(torch.float16).float())
    plain = quantize(w, parse_args("w4g32"))
    assert plain.scale.flatten().tolist() == pytest.approx([0.8 / 7, 0.8 / 7], rel=1e-3)
    with pytest.raises(ConfigError, match="signed_scale"):
        parse_args("w4g32-asym").with_(signed_scale=True)


def test_iq4_nl_scale_takes_the_finer_sign():
    # IQ4_NL's levels run from -127 to 113: a block whose extreme is positive gets a negative
    # scale, so that extreme lands on -127 rather than being clipped at 113.
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 1.27, -0.5
    qt = quantize(w, parse_args("iq4_nl"))
    assert float(qt.scale) < 0
    assert abs(float(qt.dequantize()[0, 0]) - 1.27) < 2e-3


# -- llama.cpp's per-tensor rules ---------------------------------------------------------------


def test_file_type_rules_match_llama_cpp():
    assert [use_more_bits(i, 30) for i in range(8)] == [True, True, True, False, False, True, False, False]
    assert tensor_type("Q4_K_M", "attn_v", 0, 30, 1536).type == "Q6_K"
    assert tensor_type("Q4_K_M", "attn_v", 4, 30, 1536).type == "Q4_K"
    assert tensor_type("Q4_K_M", "ffn_down", 0, 30, 1536).type == "Q6_K"
    assert tensor_type("Q3_K_M", "attn_output", 5, 30, 512).type == "Q4_K"
    # SmolLM2's 576 columns: Q4_K falls back to Q5_0, Q6_K to Q8_0, as llama.cpp does
    choice = tensor_type("Q4_K_M", "attn_q", 3, 30, 576)
    assert (choice.type, choice.asked) == ("Q5_0", "Q4_K") and "576" in choice.reason
    assert tensor_type("Q4_K_M", "attn_v", 0, 30, 576).type == "Q8_0"
    assert tensor_type("Q4_0", "output", -1, 30, 576).type == "Q8_0"  # Q6_K, then its fallback
    assert tensor_type("Q4_0", "output", -1, 30, 512).type == "Q6_K"
    assert fit_row("Q2_K", 640).type == "IQ4_NL" and fit_row("Q4_0", 100).type == "F16"


def test_file_type_recipe_plans_each_linear(tiny_llama):
    recipe = Recipe(scheme="gguf:Q4_K_M", method="rtn")
    assert recipe.file_type == "Q4_K_M"
    report = quantize_model(tiny_llama, recipe, progress=False)
    planned = dict(report.recipe.overrides)
    # hidden 64 and intermediate 160: no row is a multiple of 256, so every k-quant falls back
    assert planned["model.layers.0.self_attn.q_proj"].weights.name() == "q5_0"
    assert planned["model.layers.0.self_attn.v_proj"].weights.name() == "q5_0"  # Q4_K -> Q5_0
    assert planned["model.layers.1.self_attn.v_proj"].weights.name() == "w8g32"  # Q6_K -> Q8_0
    assert planned["model.layers.1.mlp.down_proj"].weights.name() == "w8g32"
    assert report.recipe.to_dict()["file_type"] == "Q4_K_M"
    with pytest.raises(ConfigError, match="unknown GGUF file type"):
        Recipe(scheme="gguf:Q7_K")


# -- a whole model ---------------------------------------------------------------------------------


def _source_gguf(path, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_llama_round_trip_through_gguf(tiny_llama, tokenizer, tmp_path):
    quantize_model(tiny_llama, Recipe(scheme="gguf:Q4_0", method="rtn"), progress=False)
    out = tmp_path / "tiny.gguf"
    report = export(tiny_llama, tokenizer, "gguf:Q4_0", out, source_gguf=_source_gguf(tmp_path / "src.gguf"))
    assert report.bits_per_weight == 4.5 and not report.fallbacks
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["a", "b"]
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    tensors = {t.name: t for t in reader.tensors}
    cfg = tiny_llama.config
    for i in range(2):
        for hf, gname, heads in (("self_attn.q_proj", "attn_q", cfg.num_attention_heads),
                                 ("self_attn.k_proj", "attn_k", cfg.num_key_value_heads),
                                 ("mlp.down_proj", "ffn_down", None)):
            layer = tiny_llama.get_submodule(f"model.layers.{i}.{hf}")
            t = tensors[f"blk.{i}.{gname}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
            got = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(layer.out_features, -1).copy())
            ours = layer.qweight.dequantize(torch.float32)
            if heads:
                ours = ours.index_select(0, rotary_permutation(ours.shape[0], heads))
            assert torch.equal(got, ours)
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0  # untied
    # the file is lowbit's: --overwrite may replace it, and only it; the same model gives the same bytes
    first = out.read_bytes()
    export(tiny_llama, tokenizer, "gguf:Q4_0", out, overwrite=True, source_gguf=tmp_path / "src.gguf")
    assert out.read_bytes() == first
    with pytest.raises(LowbitError, match="not a GGUF file lowbit wrote"):
        export(tiny_llama, tokenizer, "gguf:Q4_0", tmp_path / "src.gguf", overwrite=True,
               source_gguf=tmp_path / "src.gguf")


def test_gguf_export_refusals(tiny_llama, tokenizer, tmp_path):
    quantize_model(tiny_llama, Recipe(scheme="w4g64", method="rtn"), progress=False)
    with pytest.raises(ExportError, match="no GGUF block type; quantize with --scheme gguf:Q4_0"):
        export(tiny_llama, tokenizer, "gguf:Q4_0", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(ExportError, match="unknown GGUF file type"):
        export(tiny_llama, tokenizer, "gguf:Q9_0", tmp_path / "x.gguf")


def test_llama_header_from_a_hugging_face_folder(tiny_llama, tokenizer, tmp_path):
    quantize_model(tiny_llama, Recipe(scheme="gguf:Q8_0", method="rtn"), progress=False)
    export(tiny_llama, tokenizer, "gguf:Q8_0", tmp_path / "x.gguf")
    fields = gguf.GGUFReader(str(tmp_path / "x.gguf")).fields
    cfg = tiny_llama.config
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 2
    assert fields["llama.attention.head_count_kv"].contents() == cfg.num_key_value_heads
    assert fields["llama.rope.dimension_count"].contents() == cfg.head_dim
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == cfg.vocab_size and tokens[3] == tokenizer.convert_ids_to_tokens(3)
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tokenizer.eos_token_id] == int(gguf.TokenType.CONTROL) and types[3] == int(gguf.TokenType.NORMAL)


def test_other_architectures_need_their_gguf_header(tokenizer, tmp_path):
    from lowbit.models.tiny import tiny_model

    model = tiny_model("qwen3", seed=0)
    quantize_model(model, Recipe(scheme="gguf:Q8_0", method="rtn"), progress=False)
    with pytest.raises(ExportError, match="--source FILE.gguf"):
        export(model, tokenizer, "gguf:Q8_0", tmp_path / "x.gguf")
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing half-written is left


def test_plan_mismatch_is_refused(tiny_llama, tokenizer, tmp_path):
    quantize_model(tiny_llama, Recipe(scheme="gguf:Q8_0", method="rtn"), progress=False)
    with pytest.raises(ExportError, match="llama.cpp's Q4_0 puts Q4_0 there"):
        export(tiny_llama, tokenizer, "gguf:Q4_0", tmp_path / "x.gguf", source_gguf=_source_gguf(tmp_path / "s.gguf"))


def test_file_types_turn_on_gptq_scale_search_unless_told():
    assert Recipe(scheme="gguf:Q4_0", method="gptq").method_options == {"gptq.scale_search": True}
    assert Recipe(scheme="gguf:Q4_0", method="awq+gptq").to_dict()["stages"][1]["options"]["scale_search"]
    assert Recipe(scheme="gguf:Q4_0", method="gptq", method_options={"scale_search": "false"}).method_options == {
        "scale_search": False}
    assert Recipe(scheme="q4_0", method="gptq").method_options == {}  # a grid alone changes nothing


def test_float_gguf_of_a_float_model(tiny_llama, tokenizer, tmp_path):
    out = tmp_path / "f16.gguf"
    report = export(tiny_llama, tokenizer, "gguf:F16", out)
    assert report.bits_per_weight == 16.0
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    k = tiny_llama.get_submodule("model.layers.1.self_attn.k_proj").weight
    t = tensors["blk.1.attn_k.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F16
    expected = k.detach().index_select(0, rotary_permutation(k.shape[0], tiny_llama.config.num_key_value_heads))
    assert torch.equal(torch.from_numpy(t.data.copy()).reshape(k.shape), expected.to(torch.float16))
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    with pytest.raises(ExportError, match="no quantized linears"):
        export(tiny_llama, tokenizer, "gguf:Q4_0", tmp_path / "q.gguf")
