"""The fused kernel packages transformers picks up for the recurrent layers, or the fallback."""
from __future__ import annotations

import importlib
import importlib.util

from capsule_ros.doctor import Check

# module -> (pip name, what it accelerates, what runs without it and what that costs)
PACKAGES = {
    "fla": ("flash-linear-attention", "gated-delta-net layers (Triton chunk + recurrent kernels)",
            "transformers' PyTorch gated-delta rule: a Python loop over chunks of small eager "
            "kernels in prefill and several more launches per decode step"),
    "mamba_ssm": ("mamba-ssm (Triton-only build, scripts/gpu_wheels.sh)",
                  "Mamba2 layers (Triton chunk scan + state update)",
                  "transformers' Mamba2 torch_forward: the chunked scan in eager PyTorch, "
                  "materialising per-chunk segment sums (more memory traffic in prefill)"),
}
FAMILY_KERNELS = {
    "qwen3_5_text": ("fla",), "qwen3_next": ("fla",),
    "bamba": ("mamba_ssm",), "nemotron_h": ("mamba_ssm",), "granitemoehybrid": ("mamba_ssm",),
    "falcon_h1": ("mamba_ssm",),
    "lfm2": (),   # short convolution: transformers' PyTorch path (causal-conv1d is optional)
}
# Shared by both fallbacks, and the part that bites later: the torch path keeps recurrent state
# in float32 under a bf16 model, fused kernels may not; the dtype is in the capsule fingerprint.
FINGERPRINT_NOTE = ("capsule files written on one path are refused on the other (the recurrent "
                    "state dtype is part of the fingerprint)")


def _probe(module: str) -> tuple[str, str]:
    """("absent" | "broken" | "ok", detail)."""
    if importlib.util.find_spec(module) is None:
        return "absent", "not installed"
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a half-installed package raises anything
        return "broken", f"installed but does not import: {type(exc).__name__}: {exc}"
    return "ok", f"{getattr(mod, '__version__', '?')} imports"


def check_kernels(cuda: bool, model_type: str | None, require: bool) -> Check:
    wanted = FAMILY_KERNELS.get(model_type, tuple(PACKAGES)) if model_type else tuple(PACKAGES)
    if not wanted:
        return Check("kernels", "skipped", f"{model_type}: no fused kernel package applies")
    states = {m: _probe(m) for m in wanted}
    facts = {m: {"state": s, "detail": d} for m, (s, d) in states.items()}
    lines = [f"{m}: {d}" for m, (s, d) in states.items()]
    broken = [m for m, (s, _) in states.items() if s == "broken"]
    absent = [m for m, (s, _) in states.items() if s == "absent"]
    if broken:
        # transformers sees the package, tries to use it, and the model load fails.
        return Check("kernels", "fail", "; ".join(lines) + ". A present-but-broken package "
                     "breaks model loading: reinstall it or uninstall it to get the fallback", facts)
    if absent and require:
        return Check("kernels", "fail", "; ".join(
            f"{m} ({PACKAGES[m][0]}) is not installed; needed for {PACKAGES[m][1]}"
            for m in absent) + " (kernels required)", facts)
    if absent and cuda:
        costs = "; ".join(f"without {m}: {PACKAGES[m][2]}" for m in absent)
        return Check("kernels", "warn", "; ".join(lines) + f". Fallback in use: {costs}; "
                     f"{FINGERPRINT_NOTE}. Not measured on a Thor", facts)
    if not cuda:
        return Check("kernels", "skipped", "no CUDA device: the PyTorch path runs on CPU ("
                     + "; ".join(lines) + ")", facts)
    return Check("kernels", "ok", "; ".join(lines), facts)
