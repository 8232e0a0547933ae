"""Model families and the binding of a transformers hybrid to the live state."""
from .hybrid import HybridModel, ModelLoadError, ModelSpec
from .registry import FAMILIES, Family, family_for

__all__ = ["FAMILIES", "Family", "HybridModel", "ModelLoadError", "ModelSpec", "family_for"]
