"""Recipe stages (transforms and weight quantizers), registered by name (``resolve_stages``)."""

from lowbit.methods.base import (
    STAGES,
    STATISTICS,
    HessianStats,
    InputStats,
    LayerResult,
    LinearStats,
    Quantizer,
    Stage,
    Target,
    Transform,
    get_method,
    register_stage,
    resolve_stages,
    stage_names,
)

__all__ = [
    "STAGES", "STATISTICS", "HessianStats", "InputStats", "LayerResult", "LinearStats", "Quantizer",
    "Stage", "Target", "Transform", "get_method", "register_stage", "resolve_stages", "stage_names",
]
