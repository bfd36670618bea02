"""GGUF files of the bundled models, written by lowbit and run by llama.cpp itself (the xllamacpp
wheel), read back by gguf-py and transformers (slow: `make test-slow`).

For each file type: llama.cpp loads the file and answers a chat prompt; on the same tokens its
next-token top-10 distribution agrees with lowbit's evaluation of the same codes within
llama.cpp's own runtime error (it quantizes activations inside its dot products; measured in
the same run as llama.cpp running the model's original GGUF file against that file's
dequantized weights) and far better than with the float model it was quantized from;
gguf-py's dequantizer gives back lowbit's exact weights.
"""

import gguf
import pytest
import torch
from gguf.quants import dequantize

from lowbit.data.calibration import evaluation_tokens
from lowbit.eval.llamacpp import compare_with_llamacpp, llamacpp_server, model_logprobs
from lowbit.export import export
from lowbit.export.gguf import rotary_permutation
from lowbit.export.gguf_blocks import q1_offset_error
from lowbit.models.load import load_model, source_gguf
from lowbit.quantize import quantize_pretrained
from lowbit.recipe import Recipe

pytestmark = pytest.mark.slow
xllamacpp = pytest.importorskip("xllamacpp")

SMOL_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "IQ4_NL", "Q4_K_M", "Q2_K"]
GEMMA_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "IQ4_NL", "Q4_K_M"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("gguf-sources")
    return {name: source_gguf(name, scratch) for name in ("smollm2-135m", "gemma3-270m")}


@pytest.fixture(scope="module")
def references(sources):
    """Per bundled model: 96 held-out token ids, the float model's log-probabilities on them,
    and llama.cpp's runtime error: the top-10 KL between llama.cpp running the model's own
    GGUF file and torch running that file's dequantized weights (about 0.003 for SmolLM2, 0.02
    for Gemma-3 here)."""
    out = {}
    for name in ("smollm2-135m", "gemma3-270m"):
        model, tok = load_model(name)
        ids = evaluation_tokens(tok, max_tokens=96).flatten()[:96].tolist()
        lp = model_logprobs(model, ids)
        with llamacpp_server(sources[name], n_ctx=512) as server:
            runtime = compare_with_llamacpp(server, lp, ids).top_k_kl
        out[name] = (ids, lp, runtime)
        del model
    return out


def _check(name, file_type, sources, references, tmp_path):
    qmodel, tok, _ = quantize_pretrained(name, Recipe(scheme=f"gguf:{file_type}", method="rtn"), progress=False)
    out = tmp_path / f"{name}-{file_type}.gguf"
    report = export(qmodel, tok, f"gguf:{file_type}", out, source_gguf=sources[name])
    ids, float_lp, runtime = references[name]
    reader = gguf.GGUFReader(str(out))
    _use_file_embeddings(qmodel, reader)  # the embeddings the file holds (rounded at export)
    with llamacpp_server(out, n_ctx=512) as server:
        same = compare_with_llamacpp(server, model_logprobs(qmodel, ids), ids)
        vs_float = compare_with_llamacpp(server, float_lp, ids)
        answer = server.handle_chat_completions({
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24, "temperature": 0})["choices"][0]["message"]["content"]
    print(f"{name} {file_type}: {report.bits_per_weight:.3f} bpw, {len(report.fallbacks)} fallbacks, "
          f"top-10 KL vs same codes {same.top_k_kl:.4f} (top-1 {same.top1_agreement:.3f}), "
          f"vs float {vs_float.top_k_kl:.4f}, llama.cpp's runtime error {runtime:.4f}; answer {answer!r}")
    assert same.top_k_kl < 1.5 * runtime + 0.002 and same.top1_agreement >= 0.9
    # Where quantizing moved the model well beyond llama.cpp's runtime noise, the file must be far
    # closer to lowbit's codes than to the float model (not so for Q8_0, nor for Q4_1 on
    # SmolLM2, whose float weights already lie on the Q4_1 grid)
    if vs_float.top_k_kl > 4 * runtime:
        assert same.top_k_kl < vs_float.top_k_kl / 2
    assert answer.strip()
    # gguf-py reads lowbit's exact weights back (Q4_1's float16 offset aside)
    tensors = {t.name: t for t in reader.tensors}
    config = qmodel.config
    for i in (0, config.num_hidden_layers - 1):
        for hf, g, heads in (("self_attn.q_proj", "attn_q", config.num_attention_heads),
                             ("self_attn.v_proj", "attn_v", None), ("mlp.down_proj", "ffn_down", None)):
            layer = qmodel.get_submodule(f"model.layers.{i}.{hf}")
            t = tensors[f"blk.{i}.{g}.weight"]
            got = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(layer.out_features, -1).copy())
            ours = layer.qweight.dequantize(torch.float32)
            if heads and reader.fields["general.architecture"].contents() == "llama":
                ours = ours.index_select(0, rotary_permutation(ours.shape[0], heads))
            if t.tensor_type == gguf.GGMLQuantizationType.Q4_1:  # m = -z * s rounded to float16
                assert (got - ours).abs().max() <= q1_offset_error(layer.qweight) + 1e-6
            else:
                assert torch.equal(got, ours), (file_type, t.name)
    return qmodel, out, report


def _use_file_embeddings(model, reader) -> None:
    """Give ``model`` the token embeddings of the GGUF file: lowbit keeps them in float, the
    export rounds them to the type llama.cpp's rules give them (Q8_0 / Q6_K here)."""
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    emb = model.get_input_embeddings()
    values = dequantize(t.data, t.tensor_type).reshape(emb.weight.shape)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(values.copy()))


@pytest.mark.parametrize("file_type", SMOL_TYPES)
def test_llamacpp_runs_smollm2_gguf(file_type, sources, references, tmp_path):
    _check("smollm2-135m", file_type, sources, references, tmp_path)


@pytest.mark.parametrize("file_type", GEMMA_TYPES)
def test_llamacpp_runs_gemma3_gguf(file_type, sources, references, tmp_path):
    _check("gemma3-270m", file_type, sources, references, tmp_path)


def test_transformers_reads_lowbit_gguf(sources, references, tmp_path):
    """transformers' GGUF loader (what `lowbit eval FILE.gguf` uses) gives lowbit's weights."""
    qmodel, out, report = _check("smollm2-135m", "Q4_K_M", sources, references, tmp_path)
    assert any("Q4_K -> Q5_0" in f for f in report.fallbacks)  # 576 columns: llama.cpp's fallback
    assert any(v.startswith("Q4_K") for v in report.layers.values())  # down_proj's 1536 columns fit
    model, _ = load_model(str(out))
    state = model.state_dict()
    for name, module in qmodel.named_modules():
        if hasattr(module, "qweight"):
            assert torch.equal(state[name + ".weight"], module.qweight.dequantize(torch.float32)), name
