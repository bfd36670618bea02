"""lowbit: quantize Hugging Face causal language models and measure what it cost."""

__version__ = "0.1.0"
