"""Non-finite weights and scales: refused with the tensor's name, or kept in float on request."""

import pytest
import torch

from lowbit.models.tiny import tiny_model
from lowbit.nn import QuantizedLinear
from lowbit.pipeline.layerwise import NonFiniteError
from lowbit.quantize import quantize
from lowbit.recipe import Recipe

NAME = "model.layers.1.mlp.up_proj"


def _poisoned(value: float):
    model = tiny_model(seed=9)
    with torch.no_grad():
        model.get_submodule(NAME).weight[3, 5] = value
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
def test_non_finite_weight_is_refused_naming_the_tensor(value, method):
    calib = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteError, match=f"weight of {NAME} has 1 NaN or infinite"):
        quantize(_poisoned(value), Recipe(scheme="w4g32", method=method), calib, progress=False)


def test_fp16_scale_overflow_is_refused():
    with pytest.raises(NonFiniteError, match=f"scales of {NAME}.*overflows torch.float16"):
        quantize(_poisoned(1e6), Recipe(scheme="w4g32"), progress=False)


def test_keep_in_float_on_request_and_report_it():
    model = _poisoned(float("nan"))
    report = quantize(model, Recipe(scheme="w4g32"), on_nonfinite="float", progress=False)
    assert isinstance(model.get_submodule(NAME), torch.nn.Linear)
    assert isinstance(model.get_submodule("model.layers.1.mlp.gate_proj"), QuantizedLinear)
    assert len(report.layers) == 13
    assert [k["name"] for k in report.kept_float] == [NAME]
    assert "NaN" in report.to_dict()["kept_float"][0]["reason"]
    assert all(torch.isfinite(torch.tensor(r.objective_value)) for r in report.layers)
