"""Action heads: the backbone's last hidden state -> what a stream publishes.

Two kinds (``spec['head']``):
  continuous  ``ContinuousActionHead``: hidden ``[hidden]`` -> a chunk ``[horizon, dof]`` of joint
              targets, one every ``step_period`` seconds (see ``safety`` for what a chunk means).
              spec: horizon, dof, step_period (s), scale (1.0; a number or one per dof),
              offset (0.0; a number or one per dof), mlp_ratio (1; 0 = a single linear layer).
              Output = offset + scale * tanh(MLP(h)), so the range is known before training.
  tokens      ``TokenSampler``: greedy (temperature 0) or temperature + top-p sampling.
              spec: temperature (0.0), top_p (1.0), max_new_tokens (32), seed (0).

The sampler keeps no state of its own: randomness comes from a ``torch.Generator`` the engine
owns per stream and stores in the capsule (``generator.get_state()``), so a restored stream
samples the same continuation. The generator must live on the logits' device.

Head weights are seeded with a local generator (global RNG untouched) until
``weights.load_policy_weights`` replaces them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from capsule_ros.policy.weights import SeededInit
from capsule_ros.status_codes import CapsuleRosError, Code


def _per_dof(value: float | Sequence[float], dof: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        return t.expand(dof).clone()
    if t.numel() != dof:
        raise ValueError(f"head {what}: {t.numel()} values for {dof} dof")
    return t


class ContinuousActionHead(nn.Module):
    """hidden ``[hidden]`` -> action chunk ``[horizon, dof]`` (float32)."""

    kind = "continuous"

    def __init__(self, hidden_size: int, horizon: int, dof: int, step_period: float, seed: int,
                 scale: float | Sequence[float] = 1.0, offset: float | Sequence[float] = 0.0,
                 mlp_ratio: int = 1, name: str = "head") -> None:
        super().__init__()
        if horizon <= 0 or dof <= 0 or not step_period > 0:
            raise ValueError(f"{name}: horizon, dof and step_period must be positive")
        self.hidden_size, self.horizon, self.dof = hidden_size, horizon, dof
        self.step_period = float(step_period)
        init = SeededInit(seed, name)
        out = horizon * dof
        if mlp_ratio > 0:
            width = mlp_ratio * hidden_size
            self.net = nn.Sequential(init.linear(hidden_size, width), nn.GELU(), init.linear(width, out))
        else:
            self.net = nn.Sequential(init.linear(hidden_size, out))
        # configuration, not learned: kept out of the state dict (and so out of policy weights)
        self.register_buffer("scale", _per_dof(scale, dof, "scale"), persistent=False)
        self.register_buffer("offset", _per_dof(offset, dof, "offset"), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.numel() != self.hidden_size:  # one position's hidden state, [hidden] or [1, hidden]
            raise CapsuleRosError(Code.INTERNAL, f"head: hidden {tuple(h.shape)}, expected [{self.hidden_size}]")
        x = h.reshape(-1).to(self.scale.device, torch.float32)
        a = torch.tanh(self.net(x)).reshape(self.horizon, self.dof)
        return self.offset + self.scale * a


class TokenSampler:
    """Picks the next token id from logits: greedy or temperature + nucleus (top-p) sampling."""

    kind = "tokens"

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, *,
                 max_new_tokens: int = 32, seed: int = 0) -> None:
        if not temperature >= 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.max_new_tokens, self.seed = int(max_new_tokens), int(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def new_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh per-stream generator seeded from ``seed`` (the engine keeps one per stream)."""
        return torch.Generator(device=device).manual_seed(self.seed)

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """One token id from ``logits`` ``[vocab]`` (a leading batch of 1 is accepted)."""
        logits = logits.reshape(-1).float()
        if bool(torch.isnan(logits).any()):
            raise CapsuleRosError(Code.INTERNAL, "sampler: NaN in logits")
        if self.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the top token always stays)
            keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < self.top_p
            sorted_p = sorted_p * keep
            choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=generator))


HEAD_KINDS = ("continuous", "tokens")


def build_head(spec: dict, hidden_size: int, seed: int,
               name: str = "head") -> ContinuousActionHead | TokenSampler:
    """Build a stream's head from its config ``spec`` (``spec['head']`` is the kind)."""
    kind = spec.get("head")
    if kind == "continuous":
        missing = [k for k in ("horizon", "dof", "step_period") if k not in spec]
        if missing:
            raise ValueError(f"{name}: continuous head needs {missing}")
        return ContinuousActionHead(hidden_size, int(spec["horizon"]), int(spec["dof"]),
                                    float(spec["step_period"]), seed,
                                    scale=spec.get("scale", 1.0), offset=spec.get("offset", 0.0),
                                    mlp_ratio=int(spec.get("mlp_ratio", 1)), name=name)
    if kind == "tokens":
        return TokenSampler(float(spec.get("temperature", 0.0)), float(spec.get("top_p", 1.0)),
                            max_new_tokens=int(spec.get("max_new_tokens", 32)),
                            seed=int(spec.get("seed", seed)))
    raise ValueError(f"{name}: unknown head '{kind}'; choose from {list(HEAD_KINDS)}")
