"""Family descriptors: the few facts about an architecture family the binding needs.

Which layers hold which state is derived from the transformers cache itself (see hybrid.py);
a descriptor only says what cannot be derived: expected state dtypes and how logits are made.
Adding a family is one entry here plus a tiny config in ``config/models/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def _lm_head(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(hidden.to(model.lm_head.weight.dtype))


@dataclass(frozen=True)
class Family:
    model_type: str
    kind: str                       # the recurrent mechanism, for docs and --list
    logits_fn: Callable = _lm_head

    def conv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype

    def recurrent_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype

    def logits(self, model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_fn(model, hidden)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen3_5_text", "gated-delta-net + attention"),
    Family("bamba", "mamba2 + attention"),
    Family("nemotron_h", "mamba2 + attention (+ mlp-only layers)"),
    Family("granitemoehybrid", "mamba2 + attention"),
    Family("lfm2", "short-conv + attention"),
)}


def family_for(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"model family {model_type!r} is not supported; known: {sorted(FAMILIES)}") from None
