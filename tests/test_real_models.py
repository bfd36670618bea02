"""Acceptance on the real bundled models (slow: `make test-slow`).

Accuracy gates are relative to the unquantized model on held-out wiki text. The bundled weights
were dequantized from GGUF Q4_1 (SmolLM2) and Q5_0/Q4_K/Q6_K (Gemma-3) files, so the 4- and
3-bit comparisons use symmetric groups of 128, off those grids (see docs/results.md).
"""

import copy

import pytest
import torch

from lowbit import io
from lowbit.contents import inspect_folder
from lowbit.data.calibration import CalibrationSpec, calibration_tokens, evaluation_tokens
from lowbit.eval.metrics import compare_models
from lowbit.models.load import load_model
from lowbit.quantize import quantize
from lowbit.recipe import Recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def smol_eval(smol):
    return evaluation_tokens(smol[1], max_tokens=4096)


@pytest.fixture(scope="module")
def smol_calib(smol):
    return calibration_tokens(CalibrationSpec(num_samples=32, seq_len=512), smol[1])


def quantized(model, recipe, calibration=None):
    copy_ = copy.deepcopy(model)
    quantize(copy_, recipe, calibration, progress=False)
    return copy_


def fidelity(model, reference, ids):
    return compare_models(model, reference, ids, progress=False)


def chat(model, tokenizer, question: str, tokens: int = 24) -> str:
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_w8_per_channel_is_nearly_free(smol, smol_eval):
    model, _ = smol
    r = fidelity(quantized(model, Recipe(scheme="w8")), model, smol_eval)
    assert r.num_scored >= 4000
    assert r.mean_kl < 0.01
    assert abs(r.perplexity_change_pct) < 1.0


def test_w4g128_size_reload_and_chat(smol, smol_eval, tmp_path):
    model, tokenizer = smol
    recipe = Recipe(scheme="w4g128")
    q = quantized(model, recipe)
    out = io.save(q, tmp_path / "w4", tokenizer=tokenizer, recipe=recipe)
    info = inspect_folder(out)
    bf16_bytes = 2 * info.quantized_params
    assert info.quantized_params == sum(
        m.weight.numel() for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    assert info.quantized_bytes <= 0.40 * bf16_bytes
    again, tok = io.load(out)
    with torch.no_grad():
        ids = smol_eval[:, :256]
        assert torch.equal(q(ids).logits, again(ids).logits)
    answer = chat(again, tok, "What is the capital of France?")
    assert "Paris" in answer, answer


@pytest.mark.parametrize("scheme", ["w4g128", "w3g128"])
def test_gptq_and_awq_beat_rtn(smol, smol_eval, smol_calib, scheme):
    model, _ = smol
    rtn = fidelity(quantized(model, Recipe(scheme=scheme)), model, smol_eval).mean_kl
    gptq, awq = (
        fidelity(quantized(model, Recipe(scheme=scheme, method=m), smol_calib), model, smol_eval).mean_kl
        for m in ("gptq", "awq")
    )
    assert gptq < 0.85 * rtn, (gptq, rtn)
    assert awq < 0.85 * rtn, (awq, rtn)


def test_gptq_is_bit_for_bit_reproducible(smol):
    model, tokenizer = smol
    calib = calibration_tokens(CalibrationSpec(num_samples=8, seq_len=256, seed=3), tokenizer)
    again = calibration_tokens(CalibrationSpec(num_samples=8, seq_len=256, seed=3), tokenizer)
    assert torch.equal(calib, again)
    a = quantized(model, Recipe(scheme="w4g128", method="gptq"), calib).state_dict()
    b = quantized(model, Recipe(scheme="w4g128", method="gptq"), again).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- Gemma-3 270M: norms with an offset of 1, sliding-window layers, 262k vocabulary ----------


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3-270m")


def test_gemma_w8_and_calibrated_methods(gemma, tmp_path):
    model, tokenizer = gemma
    ids = evaluation_tokens(tokenizer, max_tokens=2048)
    calib = calibration_tokens(CalibrationSpec(num_samples=16, seq_len=256), tokenizer)
    w8 = quantized(model, Recipe(scheme="w8"))
    # Gemma-3 is more sensitive than SmolLM2 at W8 per channel: measured mean KL 0.0124,
    # top-1 0.945, perplexity -0.4% on these 2,044 tokens (docs/results.md).
    r = fidelity(w8, model, ids)
    assert r.mean_kl < 0.02 and abs(r.perplexity_change_pct) < 1.0, r
    out = io.save(w8, tmp_path / "w8")
    again, _ = io.load(out, with_tokenizer=False)
    with torch.no_grad():
        assert torch.equal(w8(ids[:, :128]).logits, again(ids[:, :128]).logits)

    rtn = fidelity(quantized(model, Recipe(scheme="w4g128")), model, ids).mean_kl
    gptq = fidelity(quantized(model, Recipe(scheme="w4g128", method="gptq"), calib), model, ids).mean_kl
    awq = fidelity(quantized(model, Recipe(scheme="w4g128", method="awq"), calib), model, ids).mean_kl
    assert gptq < rtn and awq < rtn, (rtn, gptq, awq)
