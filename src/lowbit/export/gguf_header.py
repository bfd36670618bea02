"""The GGUF header of a Llama-family model that came from a Hugging Face folder (no GGUF file to
copy it from): hyper-parameters from its config, tokenizer from its ``tokenizer.json``.

Restates, for this one family, what llama.cpp's convert_hf_to_gguf.py writes (keys from
gguf-py's constants): ``llama.*`` hyper-parameters, ``tokenizer.ggml.model = gpt2`` (byte-level
BPE) with the tokens, their types (special added tokens are CONTROL, so chat markers stay
single tokens), merges and special token ids through gguf-py's ``SpecialVocab``. Not restated:
the pre-tokenizer name llama.cpp derives from a hash of test tokenizations; ``default`` is
written, so llama.cpp may split raw text differently from the original tokenizer (token ids
given directly are unaffected). Sentencepiece tokenizers (Llama 2) and other architectures
are refused: for those, export from the model's own GGUF file (``--source``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from lowbit.export.base import ExportError

SUPPORTED = ("llama", "mistral")


def write_llama_header(writer, config, tokenizer) -> None:
    import gguf

    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED:
        raise ExportError(
            f"GGUF export of a {model_type} model needs its original GGUF file for the header "
            f"(lowbit writes headers itself only for {', '.join(SUPPORTED)}); pass --source FILE.gguf")
    if tokenizer is None:
        raise ExportError("GGUF export needs the model's tokenizer; the folder has none")
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") not in ("default", None):
        raise ExportError("GGUF export from a Hugging Face folder does not write rope scaling yet; "
                          "pass --source FILE.gguf (the model converted by llama.cpp)")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    with tempfile.TemporaryDirectory(prefix="lowbit-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = gguf.vocab.BpeVocab(Path(tmp))
        except (FileNotFoundError, ValueError) as err:
            raise ExportError(f"the tokenizer is not byte-level BPE ({err}); pass --source FILE.gguf") from None
        data = json.loads((Path(tmp) / "tokenizer.json").read_text())
        special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        tokens, types = [], []
        for i, (text, _, kind) in enumerate(vocab.all_tokens()):
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if i in special else kind)
        if len(tokens) < config.vocab_size:  # embedding rows beyond the tokenizer
            for i in range(len(tokens), config.vocab_size):
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
