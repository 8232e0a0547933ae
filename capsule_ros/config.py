"""The node's configuration: inputs, streams, model, capsules, actuation.

One parser serves both callers: the ROS node hands it its parameters (flattened dotted names, as
ROS 2 makes them from nested YAML), and offline tools hand it the same YAML file. So the node and
an offline run of the same bag cannot disagree about what a stream is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

NODE_NAME = "capsule_node"
TRIGGERLESS = ("",)


class ConfigError(ValueError):
    """A configuration mistake; the message names the parameter."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    topic: str
    type: str                    # "sensor_msgs/msg/Image"
    encoder: dict                # encoder kind and options, handed to policy.encoders
    qos_depth: int = 10


@dataclass(frozen=True)
class StreamSpec:
    name: str
    trigger: str                 # input that triggers queries
    context: tuple[str, ...]     # inputs that only add context
    head: dict                   # action head kind and options


@dataclass(frozen=True)
class ModelConfig:
    config_file: str = "config/models/default_qwen3_5.json"
    path: str = ""               # local checkpoint directory; wins over config_file
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    max_context: int = 4096
    chunk_size: int = 64
    cuda_graphs: bool = True     # on CUDA: appends and decode replay captured graphs
    policy_weights: str = ""     # policy.safetensors (encoders + heads); "" = beside the checkpoint


@dataclass(frozen=True)
class CapsuleConfig:
    history_depth: int = 8
    context_policy: str = "rebase"   # refuse | reset | rebase
    rebase_window: int = 8
    directory: str = ""              # capsule files: ~/capsule save/load, persistence, file tier
    persist_on_commit: bool = False  # write each stream's boundary after commit (background)
    reload_at_start: bool = False    # streams start at their persisted boundary
    device_budget_mb: float = 0.0    # tier byte budgets; 0 = unlimited
    host_budget_mb: float = 0.0
    file_budget_mb: float = 0.0
    verify_every: int = 0            # recompute a stream cold every N commits and compare


@dataclass(frozen=True)
class ActuationConfig:
    enabled: bool = False        # JointTrajectory output is off unless asked for
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class NodeConfig:
    inputs: dict[str, InputSpec]
    streams: dict[str, StreamSpec]
    model: ModelConfig
    capsules: CapsuleConfig
    actuation: ActuationConfig

    def streams_fed_by(self, input_name: str) -> list[tuple[StreamSpec, bool]]:
        """(stream, is_trigger) for every stream that ``input_name`` feeds."""
        out = []
        for s in self.streams.values():
            if s.trigger == input_name:
                out.append((s, True))
            elif input_name in s.context:
                out.append((s, False))
        return out


def nest(flat: Mapping[str, Any]) -> dict:
    """{'a.b.c': 1} -> {'a': {'b': {'c': 1}}} (ROS 2 flattens nested parameters this way)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def from_params(params: Mapping[str, Any]) -> NodeConfig:
    """Build the config from a nested dict of parameters (``ros__parameters`` of the YAML)."""
    params = nest(params) if any("." in k for k in params) else dict(params)
    inputs_doc = dict(params.get("inputs") or {})
    streams_doc = dict(params.get("streams") or {})
    input_names = _names(inputs_doc, "inputs")
    stream_names = _names(streams_doc, "streams")

    inputs = {}
    for name in input_names:
        d = dict(_section(inputs_doc, name, "inputs"))
        for key in ("topic", "type", "encoder"):
            if not d.get(key):
                raise ConfigError(f"inputs.{name}.{key} is required")
        topic, type_, qos = d.pop("topic"), d.pop("type"), int(d.pop("qos_depth", 10))
        if type_.count("/") != 2:
            raise ConfigError(f"inputs.{name}.type must look like pkg/msg/Name, not {type_!r}")
        inputs[name] = InputSpec(name, topic, type_, d, qos)

    streams = {}
    for name in stream_names:
        d = _section(streams_doc, name, "streams")
        trigger = d.get("trigger", "")
        if trigger not in inputs:
            raise ConfigError(f"streams.{name}.trigger {trigger!r} is not a configured input")
        context = tuple(c for c in (d.get("context") or ()) if c)
        for c in context:
            if c not in inputs:
                raise ConfigError(f"streams.{name}.context names unknown input {c!r}")
        head = dict(d.get("head") or {"kind": "continuous"})
        streams[name] = StreamSpec(name, trigger, context, head)

    model = ModelConfig(**_known(params.get("model") or {}, ModelConfig, "model"))
    capsules = CapsuleConfig(**_known(params.get("capsules") or {}, CapsuleConfig, "capsules"))
    act = dict(params.get("actuation") or {})
    actuation = ActuationConfig(bool(act.pop("enabled", False)), act)
    return NodeConfig(inputs, streams, model, capsules, actuation)


def load_yaml(path: str | Path, node_name: str = NODE_NAME) -> NodeConfig:
    """The same config from a ROS 2 parameter file (``<node>: ros__parameters: ...``)."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    # Keys as rcl matches them: the node name, a wildcard namespace, or every node.
    for key in (node_name, f"/{node_name}", f"/**/{node_name}", "/**"):
        if key in doc:
            return from_params((doc[key] or {}).get("ros__parameters", {}))
    raise ConfigError(f"{path}: no section for node {node_name!r} (nor /**/{node_name} or /**)")


def _names(doc: dict, what: str) -> list[str]:
    names = doc.pop("names", None)
    if not names:
        raise ConfigError(f"{what}.names must list at least one {what[:-1]}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{what}.names has duplicates")
    return list(names)


def _section(doc: dict, name: str, what: str) -> dict:
    if name not in doc or not isinstance(doc[name], dict):
        raise ConfigError(f"{what}.{name} is listed in {what}.names but not configured")
    return doc[name]


def _known(d: Mapping[str, Any], cls: type, what: str) -> dict:
    known = set(cls.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"{what}: unknown parameter(s) {sorted(unknown)}; known: {sorted(known)}")
    return dict(d)


def package_root() -> Path:
    """Where config/ lives: the installed share directory, else the source checkout."""
    try:
        from ament_index_python.packages import get_package_share_directory
        share = Path(get_package_share_directory("capsule_ros"))
        if (share / "config").is_dir():
            return share
    except Exception:  # no ament index (plain pip install or source tree)
        pass
    return Path(__file__).resolve().parents[1]


def resolve(path: str) -> str:
    """A relative config path is relative to the package root."""
    if not path:
        return path
    p = Path(path)
    return str(p if p.is_absolute() else package_root() / p)
