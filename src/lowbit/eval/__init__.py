"""Fidelity metrics: perplexity, KL divergence to a reference model, top-1 agreement."""

from lowbit.eval.metrics import FidelityReport, PerplexityResult, Window, compare_models, perplexity, windows

__all__ = [
    "FidelityReport", "PerplexityResult", "Window", "compare_models", "perplexity", "windows",
]
