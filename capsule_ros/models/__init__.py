"""Model families and the binding of a transformers hybrid to the live state.

``HybridModel`` (and transformers with it) is imported on first use, so what runs without
transformers (the ONNX Runtime backend, offline tools) does not load it.
"""
from typing import Any

from .registry import FAMILIES, Family, family_for
from .spec import ModelLoadError, ModelSpec

__all__ = ["FAMILIES", "Family", "HybridModel", "ModelLoadError", "ModelSpec", "family_for"]


def __getattr__(name: str) -> Any:
    if name == "HybridModel":
        from .hybrid import HybridModel
        return HybridModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
