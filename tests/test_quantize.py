"""The quantize verb and the layer-by-layer pipeline on tiny models."""

from dataclasses import dataclass

import pytest
import torch

from lowbit.core import parse_args, quantize as quantize_tensor
from lowbit.errors import ConfigError
from lowbit.methods.base import STAGES, LayerResult, Quantizer
from lowbit.methods.rtn import RTN
from lowbit.models.tiny import tiny_model
from lowbit.nn import QuantizedLinear
from lowbit.pipeline.lazy import lazy_model
from lowbit.quantize import quantize
from lowbit.recipe import Recipe


class _Recording(Quantizer):
    """RTN that keeps the Hessian the pipeline handed it, per full layer name."""

    needs = frozenset({"hessian"})
    objective = "none"
    seen: dict = {}

    @dataclass(frozen=True)
    class Config:
        pass

    def quantize_target(self, target, stats):
        _Recording.seen[target.name] = stats["hessian"]
        return LayerResult(quantize_tensor(target.module.weight.data, target.args), 0.0)


@pytest.fixture
def recording_method():
    cls = type("RecordingHessian", (_Recording,), {"name": "recording_hessian"})
    STAGES.add(cls.name, cls)
    _Recording.seen = {}
    yield cls
    STAGES.remove(cls.name)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, QuantizedLinear))}


def test_rtn_replaces_every_selected_linear_and_keeps_lm_head(tiny_llama):
    shapes = [m.weight.shape for n, m in _linears(tiny_llama).items() if n != "lm_head"]
    report = quantize(tiny_llama, Recipe(scheme="w8"), progress=False)
    kinds = {n: type(m).__name__ for n, m in _linears(tiny_llama).items()}
    assert kinds.pop("lm_head") == "Linear"
    assert set(kinds.values()) == {"QuantizedLinear"}
    assert len(report.layers) == 14
    # int8 codes plus one float16 scale per output row (8.214 bits on the tiny Llama)
    rows, weights = sum(r for r, _ in shapes), sum(r * c for r, c in shapes)
    assert report.bits_per_weight == pytest.approx((8 * weights + 16 * rows) / weights, rel=1e-12)


def test_quantized_model_matches_fake_quantized_weights(tiny_llama):
    reference = tiny_model(seed=0)
    args = parse_args("w4g32-asym")
    with torch.no_grad():
        for name, module in _linears(reference).items():
            if name != "lm_head":
                module.weight.copy_(quantize_tensor(module.weight, args).dequantize())
    quantize(tiny_llama, Recipe(scheme=args), progress=False)
    ids = torch.randint(0, 259, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_ignore_overrides_and_first_match_wins(tiny_llama):
    recipe = Recipe(
        scheme="w4g32",
        ignore=("lm_head", "re:.*down_proj"),
        overrides=(("re:model\\.layers\\.0\\..*", "w8"), ("re:.*q_proj", "w2g32-asym")),
    )
    quantize(tiny_llama, recipe, progress=False)
    mods = _linears(tiny_llama)
    assert isinstance(mods["model.layers.1.mlp.down_proj"], torch.nn.Linear)
    assert mods["model.layers.0.self_attn.q_proj"].format_name == "int8"  # first match
    assert mods["model.layers.1.self_attn.q_proj"].format_name == "uint2"
    assert mods["model.layers.1.self_attn.k_proj"].format_name == "int4"


def test_errors_are_config_errors(tiny_llama, recording_method):
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize(tiny_llama, Recipe(method="recording_hessian"), progress=False)
    with pytest.raises(ConfigError, match="no linear layer matches"):
        quantize(tiny_llama, Recipe(targets=("re:nothing.*",)), progress=False)
    with pytest.raises(ConfigError, match="outside the decoder layers"):
        tokens = torch.zeros(1, 8, dtype=torch.long)
        quantize(tiny_llama, Recipe(method="recording_hessian", ignore=()), tokens, progress=False)
    with pytest.raises(ConfigError, match="unknown method"):
        quantize(tiny_llama, Recipe(method="nope"), progress=False)


def _inputs_of(model, names, ids):
    """Inputs of the named linears in one full forward pass (the slow reference)."""
    seen = {}
    mods = dict(model.named_modules())

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0].detach()

        return hook

    hooks = [mods[n].register_forward_hook(keep(n)) for n in names]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def _hessian(x):
    x = x.reshape(-1, x.shape[-1]).double()
    return (2 / x.shape[0]) * x.t() @ x


def test_pipeline_hessians_follow_the_quantized_prefix(recording_method):
    model = tiny_model(seed=1)
    calib = torch.randint(0, 259, (6, 16), generator=torch.Generator().manual_seed(3))
    quantize(model, Recipe(scheme="w4g32", method="recording_hessian"), calib, batch_size=4, progress=False)
    seen = recording_method.seen
    # q, k and v read one tensor: one shared statistics object
    assert seen["model.layers.0.self_attn.q_proj"] is seen["model.layers.0.self_attn.v_proj"]
    assert seen["model.layers.0.mlp.gate_proj"] is seen["model.layers.0.mlp.up_proj"]
    assert seen["model.layers.0.self_attn.q_proj"] is not seen["model.layers.0.self_attn.o_proj"]
    # layer 0 sees the float model's inputs; layer 1 sees the outputs of quantized layer 0
    fresh = tiny_model(seed=1)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    ref0 = _inputs_of(fresh, names[:1], calib)[names[0]]
    torch.testing.assert_close(seen[names[0]].hessian.double(), _hessian(ref0), rtol=1e-5, atol=1e-6)
    ref1_float = _inputs_of(fresh, names[1:], calib)[names[1]]
    partial = tiny_model(seed=1)  # quantized layer 0, float layer 1: what layer 1 saw
    partial.model.layers[0] = model.model.layers[0]
    ref1_quant = _inputs_of(partial, names[1:], calib)[names[1]]
    got = seen[names[1]].hessian.double()
    torch.testing.assert_close(got, _hessian(ref1_quant), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, _hessian(ref1_float), rtol=1e-4, atol=1e-5)
    assert seen[names[1]].rows == calib.numel()


def test_lazy_loading_gives_the_same_result_as_a_loaded_model(tmp_path, recording_method):
    tiny_model(seed=2).save_pretrained(tmp_path)
    calib = torch.randint(0, 259, (4, 16), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(scheme="w4g32", method="recording_hessian")
    full = tiny_model(seed=2)
    quantize(full, recipe, calib, progress=False)
    lazy, checkpoint = lazy_model(tmp_path, "model.layers")
    assert all(p.is_meta for p in lazy.model.layers.parameters())
    assert not lazy.model.embed_tokens.weight.is_meta
    quantize(lazy, recipe, calib, checkpoint=checkpoint, progress=False)
    a, b = full.state_dict(), lazy.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_inputs_same_output_bit_for_bit(recording_method):
    calib = torch.randint(0, 259, (4, 16), generator=torch.Generator().manual_seed(0))
    states = []
    for _ in range(2):
        model = tiny_model(seed=4)
        quantize(model, Recipe(scheme="w3g32", method="recording_hessian"), calib, progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_rtn_method_is_registered():
    assert STAGES.get("rtn") is RTN


class _TwoInputs(torch.nn.Module):
    """q reads one tensor, gate another of the same shape, allocated after the first is freed:
    the allocator is free to hand gate's input the address q's input had."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(64, 64, bias=False)
        self.gate = torch.nn.Linear(64, 64, bias=False)

    def forward(self, x):
        a = x * 2
        y = self.q(a)
        del a
        b = y + 1
        return self.gate(b)


def test_linears_on_different_tensors_never_share_statistics(recording_method):
    from lowbit.core import parse_args
    from lowbit.methods.base import Target
    from lowbit.pipeline.capture import collect_stats

    layer = _TwoInputs()
    args = parse_args("w4g32")
    targets = [Target("q", "q", layer.q, args), Target("gate", "gate", layer.gate, args)]
    x = torch.randn(4, 256, 64)
    with collect_stats(layer, targets, {"hessian"}, x.shape[0] * x.shape[1]) as stats, torch.no_grad():
        for _ in range(3):
            layer(x)
    assert stats["q"] is not stats["gate"]
    a = x * 2
    b = layer.q(a) + 1
    torch.testing.assert_close(
        stats["gate"]["hessian"].hessian.double(), _hessian(b.detach()), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("chunk_bytes", [12, 60, 1 << 20])
def test_checkpoint_copies_large_tensors_in_chunks_exactly(tmp_path, monkeypatch, chunk_bytes):
    from safetensors.torch import save_file

    from lowbit.pipeline.lazy import Checkpoint

    tensors = {
        "big": torch.randn(37, 5), "half": torch.randn(10, 3).to(torch.bfloat16),
        "vector": torch.randn(7), "scalar": torch.tensor(2.5), "row": torch.randn(1, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    checkpoint = Checkpoint(tmp_path)
    monkeypatch.setattr(Checkpoint, "chunk_bytes", chunk_bytes)  # 12: 2-row chunks of "half"
    for name, tensor in tensors.items():
        got = checkpoint.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
