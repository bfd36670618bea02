"""Random truncations and byte changes of a tiny safetensors checkpoint (float and lowbit) and of
a tiny GGUF file: every reader gives a one-line error or a correct load, never a traceback and
never a silently wrong tensor. Fixed seeds; a few hundred cases in seconds.

"Correct" for a changed byte: in a header, the load equals the original (or, for GGUF metadata,
the change shows in the config); in the data, only the tensor holding that byte may differ,
since nothing but a checksum can tell a changed weight from an intended one. lowbit's own
checkpoints record a checksum, so there every change is refused.
"""

import json
import logging
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit import io
from lowbit.errors import LowbitError
from lowbit.models.load import convert_gguf, load_model
from lowbit.models.tiny import byte_tokenizer, tiny_model
from lowbit.pipeline.lazy import lazy_model
from lowbit.quantize import quantize
from lowbit.recipe import Recipe


def mutations(data: bytes, header_end: int, cases: int, seed: int):
    """(changed bytes, changed position or None for a truncation): 30% truncations, 50% one
    byte of the header replaced, 20% one byte of the data."""
    rng = random.Random(seed)
    for _ in range(cases):
        roll = rng.random()
        if roll < 0.3:
            yield data[:rng.randrange(len(data))], None
            continue
        pos = rng.randrange(header_end) if roll < 0.8 else rng.randrange(header_end, len(data))
        changed = bytearray(data)
        changed[pos] = (changed[pos] + rng.randrange(1, 256)) % 256
        yield bytes(changed), pos


def safetensors_layout(file: Path) -> tuple[int, dict[str, range]]:
    """The header's end and each tensor's byte range in the file."""
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return 8 + n, {k: range(8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()}


def check(load, reference: dict[str, torch.Tensor], pos, header_end, owners: dict[str, range],
          checksummed=False) -> str:
    """Run ``load`` on a changed file; the outcome ("error" or "loaded") after asserting it is
    allowed (see the module docstring)."""
    try:
        got = load()
    except LowbitError as err:
        assert "\n" not in str(err).strip()
        return "error"
    assert set(got) == set(reference)
    differ = {k for k in reference if got[k].shape != reference[k].shape or not torch.equal(got[k], reference[k])}
    if pos is None or pos < header_end or checksummed:
        assert not differ, (pos, differ)
    else:
        assert differ <= {k for k, r in owners.items() if pos in r}, (pos, differ)
    return "loaded"


@pytest.fixture(autouse=True)
def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)
    hf_logging.enable_progress_bar()


def test_float_safetensors_checkpoint(tmp_path):
    original = tmp_path / "original"
    model = tiny_model(seed=21)
    model.save_pretrained(original)
    byte_tokenizer().save_pretrained(original)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    header_end, owners = safetensors_layout(original / "model.safetensors")
    data = (original / "model.safetensors").read_bytes()
    case = tmp_path / "case"
    shutil.copytree(original, case)

    def lazily():  # how `lowbit quantize` reads: outside the layers first, then layer by layer
        model, checkpoint = lazy_model(case, "model.layers")
        for i, layer in enumerate(model.model.layers):
            checkpoint.load(layer, f"model.layers.{i}.", torch.float32)
        return model.state_dict()

    def whole():  # how `lowbit eval` reads a float baseline
        return load_model(case, check_finite=True)[0].state_dict()

    outcomes = []
    for i, (changed, pos) in enumerate(mutations(data, header_end, 160, seed=1)):
        (case / "model.safetensors").write_bytes(changed)
        outcomes.append(check(lazily, reference, pos, header_end, owners))
        if i % 8 == 0:
            check(whole, reference, pos, header_end, owners)
    assert 0 < outcomes.count("loaded") < outcomes.count("error")  # both paths were exercised


@pytest.mark.parametrize("checksummed", [True, False])
def test_lowbit_checkpoint(tmp_path, checksummed):
    model = tiny_model(seed=22)
    quantize(model, Recipe(scheme="w4g32-asym"), progress=False)
    original = io.save(model, tmp_path / "original")
    reference = {k: v.clone() for k, v in io._unique_state(model).items()}
    header_end, owners = safetensors_layout(original / "model.safetensors")
    data = (original / "model.safetensors").read_bytes()
    case = tmp_path / "case"
    shutil.copytree(original, case)
    if not checksummed:  # as written by a lowbit that did not record digests
        config = json.loads((case / "config.json").read_text())
        del config["quantization_config"]["files"]
        (case / "config.json").write_text(json.dumps(config))

    def load():
        return io._unique_state(io.load(case, with_tokenizer=False)[0])

    outcomes = []
    for changed, pos in mutations(data, header_end, 80, seed=2):
        (case / "model.safetensors").write_bytes(changed)
        outcomes.append(check(load, reference, pos, header_end, owners, checksummed))
    if checksummed:
        assert outcomes.count("error") == 80  # every change is refused
    else:
        assert 0 < outcomes.count("loaded") < outcomes.count("error")


def write_tiny_gguf(path: Path) -> None:
    """A one-layer llama GGUF (hidden 16, byte-level BPE vocabulary of 99), F32 and F16 weights."""
    import gguf

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    vocab = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(33, 127)] + ["th", "he"]
    hidden, ff = 16, 32
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // 2)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([3, 3, 3] + [1] * (len(vocab) - 3))
    writer.add_token_merges(["t h", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def tensor(name, *shape, dtype=np.float32):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(dtype))

    tensor("token_embd.weight", len(vocab), hidden)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", len(vocab), hidden)
    tensor("blk.0.attn_norm.weight", hidden)
    tensor("blk.0.ffn_norm.weight", hidden)
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        tensor(f"blk.0.{name}.weight", hidden, hidden, dtype=np.float16 if name == "attn_v" else np.float32)
    tensor("blk.0.ffn_gate.weight", ff, hidden)
    tensor("blk.0.ffn_up.weight", ff, hidden)
    tensor("blk.0.ffn_down.weight", hidden, ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_file(tmp_path):
    import gguf
    from safetensors.torch import load_file

    original = tmp_path / "tiny.gguf"
    write_tiny_gguf(original)
    convert_gguf(original, tmp_path / "reference")
    reference = load_file(tmp_path / "reference" / "model.safetensors")
    config = json.loads((tmp_path / "reference" / "config.json").read_text())
    header_end = gguf.GGUFReader(original).data_offset
    data = original.read_bytes()
    outcomes = []
    for i, (changed, pos) in enumerate(mutations(data, header_end, 100, seed=3)):
        case = tmp_path / f"case{i}.gguf"
        case.write_bytes(changed)
        out = tmp_path / f"case{i}"
        try:
            convert_gguf(case, out)
        except LowbitError as err:
            assert "\n" not in str(err).strip()
            outcomes.append("error")
            continue
        got = load_file(out / "model.safetensors")
        assert set(got) == set(reference)
        differ = {k for k in reference if got[k].shape != reference[k].shape or not torch.equal(got[k], reference[k])}
        if pos is not None and pos >= header_end:
            assert len(differ) <= 1, (pos, differ)  # one byte belongs to one tensor
        else:
            changed_config = json.loads((out / "config.json").read_text()) != config
            assert not differ or changed_config, (pos, differ)
        outcomes.append("loaded")
        shutil.rmtree(out)
    assert 0 < outcomes.count("loaded") < outcomes.count("error")
