"""Tiny randomly initialised models and a byte-level tokenizer, for fast tests and examples."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

BYTE_VOCAB = 256
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte plus <unk>, <s>, </s> (259 tokens); no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


_DECODER = dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16,
)
# Gemma 3 text model as in gemma-3-270m: one KV head, one sliding-window and one global layer.
_GEMMA3_TEXT = dict(
    _DECODER, num_key_value_heads=1, sliding_window=8,
    layer_types=["sliding_attention", "full_attention"],
)

TINY_CONFIGS = {
    "llama": dict(model_type="llama", **_DECODER),
    "mistral": dict(model_type="mistral", **_DECODER, sliding_window=8),
    "qwen2": dict(model_type="qwen2", **_DECODER),
    "qwen3": dict(model_type="qwen3", **_DECODER),
    "phi3": dict(model_type="phi3", **_DECODER),
    "gemma3_text": dict(model_type="gemma3_text", **_GEMMA3_TEXT),
    # Image-text Gemma 3: the text fields go into text_config (see tiny_model); a 1-layer SigLIP
    # whose 2x2 patch grid gives mm_tokens_per_image=4.
    "gemma3": dict(
        model_type="gemma3", text_config=_GEMMA3_TEXT, mm_tokens_per_image=4,
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
        ),
    ),
}


def tiny_model(kind: str = "llama", seed: int = 0, vocab_size: int = BYTE_VOCAB + 3, **overrides):
    """A small random causal LM of architecture ``kind`` (float32, eval mode)."""
    from transformers import AutoConfig

    fields = dict(TINY_CONFIGS[kind])
    common = dict(
        vocab_size=vocab_size, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    if "text_config" in fields:  # a composite (image-text) config: the decoder's fields go there
        fields["text_config"] = {**fields["text_config"], **common, **overrides}
        fields["tie_word_embeddings"] = False
    else:
        fields.update(common)
        fields.update(overrides)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
