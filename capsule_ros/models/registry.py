"""Family descriptors: the few facts about an architecture family the binding needs.

Which layers hold which state (K/V, conv, recurrent), and the Python-side ``has_previous_state``
flags, are derived from the transformers cache itself (see hybrid.py). A descriptor says only what
cannot be derived, i.e. what the ``*ForCausalLM`` wrapper and the base model's ``input_ids`` path
do around the ``model.model(inputs_embeds=...)`` call the binding makes:

* ``input_scale``: a config attribute the base model multiplies token embeddings by *only* on its
  ``input_ids`` path (Falcon-H1's ``embedding_multiplier``). The binding's token embedding applies
  it, so a token fed as ``inputs_embeds`` (text instructions, decoded tokens) is what ``input_ids``
  would have given. Granite-4 scales ``inputs_embeds`` inside the base model, so it needs none.
* ``logits_mul`` / ``logits_div``: a config attribute the LM head output is multiplied / divided
  by (Falcon-H1 ``lm_head_multiplier``, Granite-4 ``logits_scaling``), in the same order and dtype
  as transformers, so logits are bit-for-bit the wrapper's.
* ``float_logits``: the wrapper upcasts logits to float32 (Nemotron-H).
* ``conv_dtypes`` / ``recurrent_dtypes``: allowed state dtypes (conv: the model dtype; recurrent:
  the model dtype or float32, which the reference kernels use under bfloat16); the binding checks
  what the cache materialised against them.

Extra state outside the cache: checked for every family below (transformers 5.24), none keeps any
between calls: positions come from the ``position_ids`` the binding passes (Bamba's base model
would otherwise restart at 0 on every call), and Qwen3.5's ``rope_deltas`` lives on the
vision-language wrapper, not on the text model bound here. A family that had some would list the
attributes here and the binding would carry them in capsule metadata.

Adding a family is one entry in ``FAMILIES`` plus a tiny config ``config/models/tiny_<type>.json``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Family:
    model_type: str
    kind: str                           # the recurrent mechanism, for docs and --list
    input_scale: str | None = None      # config attr applied to token embeddings on input_ids only
    logits_mul: str | None = None       # config attr: logits = lm_head(h) * config.<attr>
    logits_div: str | None = None       # config attr: logits = lm_head(h) / config.<attr>
    float_logits: bool = False          # logits upcast to float32 by the wrapper

    def conv_dtypes(self, model_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        return (model_dtype,)

    def recurrent_dtypes(self, model_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        # The torch reference kernels (CPU, and GPU without mamba_ssm / fla) keep recurrent state
        # in float32 under a bfloat16 model; fused kernels may keep the model dtype. The cache
        # allocates with the first output's dtype and copies into it from then on, so either is
        # stable; the layout (and so the fingerprint) records which one this build got.
        return (model_dtype, torch.float32)

    def embedding_scale(self, config) -> float:
        return float(getattr(config, self.input_scale)) if self.input_scale else 1.0

    def logits(self, model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What ``model(...).logits`` holds for these hidden states (last norm already applied)."""
        logits = model.lm_head(hidden.to(model.lm_head.weight.dtype))
        if self.logits_mul:
            logits = logits * getattr(model.config, self.logits_mul)
        if self.logits_div:
            logits = logits / getattr(model.config, self.logits_div)
        if self.float_logits:
            logits = logits.float()
        return logits

    def describe(self) -> dict:
        out = {"model_type": self.model_type, "kind": self.kind}
        for key in ("input_scale", "logits_mul", "logits_div"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.float_logits:
            out["float_logits"] = True
        return out


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen3_5_text", "gated-delta-net + attention"),
    Family("bamba", "mamba2 + attention"),
    Family("nemotron_h", "mamba2 + attention (+ mlp-only layers)", float_logits=True),
    Family("falcon_h1", "parallel mamba2 || attention in every layer",
           input_scale="embedding_multiplier", logits_mul="lm_head_multiplier"),
    Family("granitemoehybrid", "mamba2 + attention (MoE feed-forward)", logits_div="logits_scaling"),
    Family("lfm2", "short-conv + attention"),
)}


def family_for(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"model family {model_type!r} is not supported; known: {sorted(FAMILIES)}") from None


def tiny_config(model_type: str) -> Path:
    """The shipped tiny config of a family (what the test suite runs)."""
    from ..config import resolve  # the installed share dir, else the source checkout
    return Path(resolve(f"config/models/tiny_{model_type}.json"))
