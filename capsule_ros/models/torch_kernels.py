"""CPU tensors always take transformers' PyTorch kernels, whatever is installed.

transformers 5.x binds a family's fast kernels (fla's gated-delta rule, mamba-ssm's scans,
causal-conv1d) once, at import, with ``use_kernel_func_from_hub_with_fallback``: when the package
imports, every call goes to it, and those are Triton/CUDA kernels that fail on CPU tensors. The
decorated function keeps the PyTorch reference as ``__wrapped__``. ``route_cpu_to_torch`` swaps
each such module-level function for a dispatcher that sends CPU calls to that reference and every
other call to the kernel transformers chose, so a CPU model and a CUDA model can live in one
process and the CUDA path is unchanged.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable

import torch

# transformers modeling modules of the supported families (and what they import kernels into).
MODULES = ("qwen3_5", "bamba", "nemotron_h", "falcon_h1", "granitemoehybrid", "lfm2")
_DONE: set[str] = set()


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def cpu_dispatcher(kernel: Callable, reference: Callable) -> Callable:
    """``kernel`` for device tensors, ``reference`` (the PyTorch code) for CPU tensors."""
    # As transformers' own wrapper does for its PyTorch path: only the keywords it names.
    params = {n for n, p in inspect.signature(reference).parameters.items()
              if p.kind is not inspect.Parameter.VAR_KEYWORD}

    @functools.wraps(reference)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        t = _first_tensor(args, kwargs)
        if t is not None and t.device.type == "cpu":
            return reference(*args, **{k: v for k, v in kwargs.items() if k in params})
        return kernel(*args, **kwargs)

    dispatch.__capsule_ros_dispatch__ = True  # type: ignore[attr-defined]
    return dispatch


def route_module(module: Any) -> list[str]:
    """Install dispatchers in one modeling module; returns the names routed."""
    routed = []
    for name, obj in list(vars(module).items()):
        reference = getattr(obj, "__wrapped__", None)
        code = getattr(obj, "__code__", None)
        if (reference is None or code is None or getattr(obj, "__capsule_ros_dispatch__", False)
                or "implementation" not in code.co_freevars  # transformers' fallback wrapper
                or getattr(reference, "__module__", None) != module.__name__):
            continue  # only kernels that wrap a PyTorch reference defined in this module
        setattr(module, name, cpu_dispatcher(obj, reference))
        routed.append(name)
    return routed


def route_cpu_to_torch() -> dict[str, list[str]]:
    """Route CPU calls to PyTorch in every supported family's modeling module (idempotent)."""
    out: dict[str, list[str]] = {}
    for family in MODULES:
        if family in _DONE:
            continue
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:  # a transformers without this family: nothing to route
            continue
        out[family] = route_module(module)
        _DONE.add(family)
    return out
