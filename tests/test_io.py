"""Native save / load: bit-identical reload, atomic writes, clear errors; the recipe record."""

import json

import pytest
import torch

from lowbit import io
from lowbit.contents import inspect_folder
from lowbit.errors import ConfigError, LowbitError, ModelLoadError, OutputError
from lowbit.models.tiny import tiny_model
from lowbit.quantize import quantize
from lowbit.recipe import Recipe


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "scheme, tied", [("w4g32-asym", False), ("w3g48", True), ("nf4", False), ("fp8_e4m3", True), ("w8", False)]
)
def test_reload_gives_identical_logits(tmp_path, tokenizer, scheme, tied):
    model = tiny_model(seed=5, tie_word_embeddings=tied)
    recipe = Recipe(scheme=scheme)
    report = quantize(model, recipe, progress=False)
    out = io.save(model, tmp_path / "q", tokenizer=tokenizer, recipe=recipe, report=report.to_dict())
    again, tok = io.load(out)
    ids = torch.randint(0, 259, (2, 24))
    assert torch.equal(_logits(model, ids), _logits(again, ids))
    assert tok("abc")["input_ids"] == tokenizer("abc")["input_ids"]
    assert (again.lm_head.weight is again.model.embed_tokens.weight) == tied
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["recipe"] == recipe.to_dict()
    assert len(config["layers"]) == 14


def test_group_index_and_float_zero_point_survive_save(tmp_path):
    from lowbit.core.tensor import QuantizedTensor
    from lowbit.nn import QuantizedLinear

    model = tiny_model(seed=6)
    quantize(model, Recipe(scheme="w4g32-asym"), progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    q = layer.qweight
    perm = torch.arange(64, dtype=torch.int32).flip(0) // 32
    odd = QuantizedTensor(q.qdata, q.scale, q.zero_point.to(torch.float16) + 0.25, q.format,
                          q.block_size, q.shape, q.dtype, perm)
    model.model.layers[0].self_attn.set_submodule("q_proj", QuantizedLinear(odd))
    out = io.save(model, tmp_path / "q")
    again, _ = io.load(out, with_tokenizer=False)
    ids = torch.randint(0, 259, (1, 16))
    assert torch.equal(_logits(model, ids), _logits(again, ids))


def test_bits_per_weight_from_disk_matches_memory(tmp_path):
    model = tiny_model(seed=7)
    report = quantize(model, Recipe(scheme="w4g32-asym"), progress=False)
    info = inspect_folder(io.save(model, tmp_path / "q"))
    assert info.bits_per_weight == pytest.approx(report.bits_per_weight)
    assert info.quantized_params == sum(r.params for r in report.layers)
    stored = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert 0 <= stored - info.file_bytes < 16_000  # the JSON headers come on top


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path):
    model = tiny_model(seed=8)
    quantize(model, Recipe(scheme="w8"), progress=False)
    out = io.save(model, tmp_path / "q")
    with pytest.raises(LowbitError, match="already exists"):
        io.save(model, out)
    io.save(model, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_failed_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    model = tiny_model(seed=9)
    quantize(model, Recipe(scheme="w8"), progress=False)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model.generation_config, "save_pretrained", crash)
    with pytest.raises(OutputError, match="cannot write output .*: disk full$"):
        io.save(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


def test_failed_overwrite_keeps_the_previous_model(tmp_path, monkeypatch):
    model = tiny_model(seed=9)
    quantize(model, Recipe(scheme="w8"), progress=False)
    out = io.save(model, tmp_path / "q")
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(model.generation_config, "save_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        io.save(model, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        io.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a model folder"):
        io.load(tmp_path / "empty")
    tiny_model().save_pretrained(tmp_path / "float")
    with pytest.raises(ModelLoadError, match="not a lowbit-quantized model"):
        io.load(tmp_path / "float")


# -- recipe --------------------------------------------------------------------------------


def test_recipe_round_trip_and_strictness(tmp_path):
    r = Recipe(scheme="w4g64-asym", method="gptq", method_options={"dampening": 0.05},
               ignore=("lm_head", "re:.*down_proj"), overrides=(("re:.*q_proj", "w8"),))
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(ConfigError, match="unknown field"):
        Recipe.from_dict({"scheme": "w4g128", "methd": "gptq"})
    with pytest.raises(ConfigError, match="bad regular expression"):
        Recipe(ignore=("re:(",))
    with pytest.raises(ConfigError, match="does not exist"):
        Recipe.from_file(tmp_path / "none.json")


def test_recipe_scheme_for():
    r = Recipe(scheme="w4g128", ignore=("lm_head",), overrides=(("re:.*\\.0\\..*", "w8"),))
    assert r.scheme_for("lm_head") is None
    assert r.scheme_for("model.layers.0.mlp.up_proj").name() == "w8"
    assert r.scheme_for("model.layers.1.mlp.up_proj").name() == "w4g128"
