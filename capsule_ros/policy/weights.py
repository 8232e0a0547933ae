"""Encoder and head weights: seeded initialisation, and the ``policy.safetensors`` file.

File: ``policy.safetensors`` beside the checkpoint (``<model.path>/policy.safetensors``), a plain
safetensors file (never pickle). Keys are ``<module key>.<parameter name>``, where the module key
is ``encoders.<input_name>`` for an input's encoder and ``head.<stream_name>`` for a stream's
continuous head, e.g. ``encoders.front_cam.proj.weight``, ``head.front.net.0.bias``. The text
encoder and the token sampler have no weights of their own (text uses the model's embedding
table), so they have no keys.

Loading is all-or-nothing: every key of every module is checked (present, same shape, finite)
before any parameter is written, so a bad file leaves the seeded weights in place. Keys in the
file for modules that are not configured are ignored (one file may serve several configs).
Until a file is supplied the weights are seeded random: ``load_policy_weights`` returns False
and the caller says so at start.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

POLICY_WEIGHTS_FILE = "policy.safetensors"


class PolicyWeightsError(ValueError):
    """The policy weights file does not fit the configured encoders and heads."""


class SeededInit:
    """Seeded parameter factory over a local generator: the global RNG is never consumed.

    The seed is mixed with the module's name (crc32, stable across processes) so two inputs built
    with the same global seed still get different projections.
    """

    def __init__(self, seed: int, name: str) -> None:
        mixed = (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
        self.gen = torch.Generator().manual_seed(mixed)

    def normal(self, *shape: int, std: float) -> nn.Parameter:
        return nn.Parameter(torch.randn(*shape, generator=self.gen) * std)

    def linear(self, fan_in: int, fan_out: int) -> nn.Linear:
        # skip_init builds nn.Linear without its own (global-RNG) initialisation
        lin = torch.nn.utils.skip_init(nn.Linear, fan_in, fan_out)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(fan_out, fan_in, generator=self.gen) / math.sqrt(fan_in))
            lin.bias.zero_()
        return lin


def policy_weights_path(checkpoint_dir: Path | str) -> Path:
    return Path(checkpoint_dir) / POLICY_WEIGHTS_FILE


def _expected(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{key}.{name}": t for key, m in modules.items() for name, t in m.state_dict().items()}


def save_policy_weights(modules: dict[str, nn.Module], path: Path | str) -> None:
    """Write every module's state dict under ``<module key>.`` (keys as in the module docstring)."""
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in _expected(modules).items()}
    save_file(tensors, str(path), metadata={"format": "capsule_ros.policy", "version": "1"})


def load_policy_weights(modules: dict[str, nn.Module], path: Path | str | None) -> bool:
    """Load ``path`` into ``modules``; False (nothing changed) when there is no file.

    Raises ``PolicyWeightsError`` naming the key on a missing key, a shape mismatch, non-finite
    values, or an unexpected key under a configured module's prefix.
    """
    if path is None or not Path(path).is_file():
        return False
    expected = _expected(modules)
    prefixes = tuple(f"{key}." for key in modules)
    loaded: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        present = set(f.keys())
        missing = sorted(set(expected) - present)
        if missing:
            raise PolicyWeightsError(f"{path}: missing key(s) {missing}")
        unexpected = sorted(k for k in present - set(expected) if k.startswith(prefixes))
        if unexpected:
            raise PolicyWeightsError(f"{path}: unexpected key(s) {unexpected} for the configured modules")
        for key, target in expected.items():
            t = f.get_tensor(key)
            if tuple(t.shape) != tuple(target.shape):
                raise PolicyWeightsError(f"{path}: key '{key}' has shape {list(t.shape)}, "
                                         f"expected {list(target.shape)}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise PolicyWeightsError(f"{path}: key '{key}' has non-finite values")
            loaded[key] = t
    with torch.no_grad():  # everything checked: now write (keeps each parameter's device/dtype)
        for key, target in expected.items():
            target.copy_(loaded[key])
    return True
