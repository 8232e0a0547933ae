"""What the node's parameter file says the doctor should check: device, family, memory."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20


@dataclass(frozen=True)
class Target:
    device: str
    model_type: str | None
    required_bytes: int | None
    how: str            # how required_bytes was estimated (it is a floor, not a measurement)


def from_params_file(path: str | Path) -> Target:
    from capsule_ros.config import load_yaml, resolve

    cfg = load_yaml(path)
    model = cfg.model
    ckpt = Path(resolve(model.path)) if model.path else None
    config_json = ckpt / "config.json" if ckpt else Path(resolve(model.config_file))
    model_type = None
    if config_json.is_file():
        model_type = json.loads(config_json.read_text()).get("model_type")
    parts, how = 0, []
    if ckpt and ckpt.is_dir():
        weights = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        parts += weights
        how.append(f"checkpoint files {weights / MiB:.0f} MiB (as stored)")
    budget = int(cfg.capsules.device_budget_mb * MiB)
    if budget:
        parts += budget
        how.append(f"capsules.device_budget_mb {cfg.capsules.device_budget_mb:g}")
    required = parts or None
    return Target(model.device, model_type, required,
                  " + ".join(how) + "; live state and activations not included" if how
                  else "nothing to estimate from (embedded model, no device budget)")
