"""The node's configuration: one home for every parameter's type, default, range and meaning.

``SCHEMA`` lists the parameters of the node; ``INPUT_KEYS`` / ``ENCODER_KEYS`` and
``STREAM_KEYS`` / ``HEAD_KEYS`` list those of each configured input and stream. The ROS node
declares exactly these (``capsule_ros.ros.params`` turns them into parameter descriptors), and
offline tools read the same YAML through the same ``from_params``, so the node and an offline run
of the same bag cannot disagree about what a stream is. Every section refuses keys it does not
know (a typo such as ``expect_sise`` is an error, not a silent default), and every error names the
parameter and what it accepts.

No ROS here: this module is imported by offline runs and tests too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

NODE_NAME = "capsule_node"


class ConfigError(ValueError):
    """A configuration mistake; the message names the parameter."""


# -- the schema -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One parameter. ``type``: bool, int, float, str, 'int[]', 'float[]', 'str[]', or
    'float|float[]' (a number or one per element). ``default`` None = optional, no value.
    ``live``: may change while the node is active (applied at once); the others are structural
    and change only while the node is unconfigured."""

    name: str
    type: Any
    default: Any
    description: str
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    live: bool = False
    required: bool = False

    def check(self, value: Any, where: str) -> Any:
        """``value`` converted to this parameter's type, or a ConfigError that names it."""
        full = f"{where}{self.name}"
        if value is None:
            if self.required:
                raise ConfigError(f"{full} is required: {self.description}")
            return None
        value = _convert(value, self.type, full)
        items = value if isinstance(value, list) else [value]
        if self.choices and any(v not in self.choices for v in items):
            raise ConfigError(f"{full}: {value!r} is not one of {list(self.choices)}")
        for v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if (self.min is not None and v < self.min) or (self.max is not None and v > self.max):
                    raise ConfigError(f"{full}: {v!r} is outside [{self.min}, {self.max}]")
        return value


def _convert(value: Any, type_: Any, name: str) -> Any:
    if type_ == "float|float[]":
        return _convert(value, "float[]" if isinstance(value, (list, tuple)) else float, name)
    if isinstance(type_, str) and type_.endswith("[]"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list ({type_}), got {value!r}")
        return [_convert(v, {"int[]": int, "float[]": float, "str[]": str}[type_], name) for v in value]
    if type_ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if type_ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if type_ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


DTYPES = ("float32", "bfloat16", "float16")
CONTEXT_POLICIES = ("refuse", "reset", "rebase")
ENCODERS = ("image", "joint_state", "float_array", "text", "point_cloud")
HEADS = ("continuous", "tokens")
BACKENDS = ("torch", "onnxruntime")
# What a CUDA step runs (the fingerprint's execution names): the lean forward of models/lean.py
# compiled whole, with only its norms compiled, or uncompiled; or transformers' modules captured.
CUDA_STEPS = ("lean-cuda+step", "lean-cuda+glue", "lean-cuda", "graph")
QOS_PROFILES = ("sensor_data", "reliable")
IMAGE_ENCODINGS = ("rgb8", "bgr8", "rgba8", "mono8", "16UC1")

# Node-level parameters (dotted ROS names).
SCHEMA: tuple[Param, ...] = (
    Param("autostart", bool, True, "configure and activate on start (under ros2 run, any launch, "
          "after a respawn); false: wait for `ros2 lifecycle set`"),
    Param("model.config_file", str, "config/models/default_qwen3_5.json",
          "model architecture config (transformers config.json), relative to the package share "
          "directory or absolute; used when model.path is empty"),
    Param("model.path", str, "", "local checkpoint directory (config.json + *.safetensors); wins "
          "over model.config_file"),
    Param("model.seed", int, 0, "seed of random weights (no checkpoint) and of encoders/heads", min=0),
    Param("model.dtype", str, "float32", "weights and KV dtype", choices=DTYPES),
    Param("model.device", str, "cpu", "cpu, cuda or cuda:N"),
    Param("model.max_context", int, 4096, "context length of every stream, in tokens",
          min=16, max=1 << 20),
    Param("model.chunk_size", int, 64, "prefill chunk (tokens); capsule boundaries align to it",
          min=1, max=4096),
    Param("model.cuda_graphs", bool, True, "on CUDA: replay captured CUDA graphs (captured at "
          "configure, never while serving)"),
    Param("model.cuda_step", str, "lean-cuda+step", "on CUDA with cuda_graphs: lean-cuda+step (the "
          "lean forward, compiled whole at configure; qwen3_5_text and bamba, other families and a "
          "kernel that fails to build fall back to graph), lean-cuda+glue, lean-cuda (uncompiled), "
          "graph (transformers' modules captured)", choices=CUDA_STEPS),
    Param("model.policy_weights", str, "", "policy.safetensors with encoder and head weights; "
          "empty: beside the checkpoint, or seeded random"),
    Param("model.backend", str, "torch", "torch: transformers modules (eager, CUDA graphs); "
          "onnxruntime: the exported step (python -m capsule_ros.export; model.path may name an "
          "export directory, else the configured model is exported once under ROS_HOME)",
          choices=BACKENDS),
    Param("model.threads", int, 0, "torch intra-op threads; 0 = all cores but one (one is left "
          "to the ROS executor)", min=0, max=1024),
    Param("queries.context_wait_ms", float, 100.0, "how long a trigger waits for context that is "
          "due (stamped before it) but not yet here; then it pairs with what has arrived",
          min=0.0, max=10000.0),
    Param("capsules.history_depth", int, 8, "boundaries kept per stream for rollback", min=1, max=1024),
    Param("capsules.context_policy", str, "rebase", "what a stream does when it nears "
          "model.max_context", choices=CONTEXT_POLICIES),
    Param("capsules.rebase_window", int, 8, "observations re-appended after a rebase", min=1),
    Param("capsules.directory", str, "", "capsule files (save/load, persistence, file tier); "
          "relative paths are relative to ROS_HOME (~/.ros)"),
    Param("capsules.persist_on_commit", bool, False, "write each stream's boundary after commit "
          "(background thread)"),
    Param("capsules.reload_at_start", bool, False, "streams start at their persisted boundary"),
    Param("capsules.device_budget_mb", float, 0.0, "device-tier byte budget (MiB); 0 = unlimited",
          min=0.0, live=True),
    Param("capsules.host_budget_mb", float, 0.0, "host-tier byte budget (MiB); 0 = unlimited",
          min=0.0, live=True),
    Param("capsules.file_budget_mb", float, 0.0, "file-tier byte budget (MiB); 0 = unlimited "
          "(needs capsules.directory)", min=0.0, live=True),
    Param("capsules.accept_other_execution", bool, False, "restore, load and install capsules "
          "computed on another execution path (eager, graph, lean-cuda, onnxruntime-cpu); "
          "refused by default: other kernels continue a state with other numerics"),
    Param("capsules.verify_every", int, 0, "recompute a stream cold every N commits and compare "
          "(0 = off)", min=0, live=True),
    Param("actuation.enabled", bool, False, "publish ~/joint_trajectory through the safety guard",
          live=True),
    Param("actuation.stream", str, "", "the stream whose continuous actions drive the arm"),
    Param("actuation.joint_names", "str[]", None, "joint names, one per action column"),
    Param("actuation.position_limits", "float[]", None, "[lo, hi] per joint, rad or m"),
    Param("actuation.velocity_limits", "float[]", None, "one per joint, rad/s or m/s"),
    Param("actuation.mode", str, "clamp", "what to do with a command beyond a limit",
          choices=("clamp", "reject")),
    Param("actuation.max_age_ms", float, 200.0, "no command from an observation older than this",
          min=0.0, live=True),
    Param("actuation.max_rate_hz", float, 0.0, "cap on passed commands; 0 = none", min=0.0, live=True),
    Param("actuation.frame_id", str, "", "header.frame_id of the trajectory"),
    Param("inputs.names", "str[]", None, "the configured inputs", required=True),
    Param("streams.names", "str[]", None, "the configured streams", required=True),
)

# Per input ``inputs.<name>.<key>``.
INPUT_KEYS: tuple[Param, ...] = (
    Param("topic", str, None, "topic to subscribe (relative names resolve in the node's namespace)",
          required=True),
    Param("type", str, None, "message type, pkg/msg/Name", required=True),
    Param("encoder", str, None, "how a message becomes embeddings", choices=ENCODERS, required=True),
    Param("qos", str, "sensor_data", "sensor_data: best effort, keep last (REP-2003, what camera "
          "drivers publish); reliable: for topics that must not drop. qos_overrides.<topic>."
          "subscription.* parameters override either", choices=QOS_PROFILES),
    Param("qos_depth", int, 5, "subscription queue depth (keep last)", min=1, max=10000),
)
# Per encoder kind, ``inputs.<name>.<key>`` (see capsule_ros/policy/encoders.py for meaning).
ENCODER_KEYS: dict[str, tuple[Param, ...]] = {
    "image": (
        Param("resize", "int[]", [32, 32], "[H, W] the image is resized to", min=1),
        Param("patch", int, 8, "patch size (divides both resize sizes)", min=1),
        Param("encodings", "str[]", list(IMAGE_ENCODINGS), "accepted encodings; a "
              "sensor_msgs/msg/CompressedImage input (JPEG/PNG, same kind) is checked by what it "
              "decodes to: colour rgb8, grey mono8, alpha rgba8, 16-bit grey PNG 16UC1",
              choices=IMAGE_ENCODINGS),
        Param("expect_size", "int[]", None, "[H, W] every image must have (optional; the decoded "
              "size for CompressedImage)", min=1),
        Param("depth_scale", float, 0.001, "16UC1 units -> metres"),
    ),
    "joint_state": (
        Param("joints", "str[]", None, "joint names, in feature order", required=True),
        Param("fields", "str[]", ["position"], "JointState fields used",
              choices=("position", "velocity", "effort")),
    ),
    "float_array": (
        Param("length", int, None, "number of floats per message", min=1, required=True),
        Param("tokens", int, 1, "tokens the array becomes", min=1),
    ),
    "text": (
        Param("max_tokens", int, 64, "longest accepted text, in tokens", min=1),
        Param("byte_offset", int, 0, "byte-level fallback: id = byte + offset", min=0),
    ),
    "point_cloud": (
        Param("tokens", int, 8, "azimuth sectors (tokens)", min=1),
    ),
}
# Per stream ``streams.<name>.<key>``.
STREAM_KEYS: tuple[Param, ...] = (
    Param("trigger", str, None, "the input whose messages trigger this stream's queries",
          required=True),
    Param("context", "str[]", None, "inputs that only add context to this stream"),
    Param("head.kind", str, "continuous", "what a query answers", choices=HEADS),
    Param("queue", str, "latest", "latest: a newer trigger supersedes one still waiting (a robot "
          "wants the freshest observation); fifo: every trigger waits its turn, up to queue_depth",
          choices=("latest", "fifo")),
    Param("queue_depth", int, 8, "fifo: triggers waiting at most (the oldest overflows)",
          min=1, max=100000),
    Param("max_age_ms", float, 0.0, "a trigger older than this (trigger stamp vs the node's "
          "clock, sim time in replays) when its turn comes is dropped as stale; 0 = no limit",
          min=0.0),
)
HEAD_KEYS: dict[str, tuple[Param, ...]] = {
    "continuous": (
        Param("head.horizon", int, None, "rows of an action chunk", min=1, required=True),
        Param("head.dof", int, None, "columns of an action chunk", min=1, required=True),
        Param("head.step_period", float, None, "seconds between rows", min=0.0, required=True),
        Param("head.columns", "str[]", None, "the name of each column (joint or axis); default "
              "a0, a1, ..."),
        Param("head.scale", "float|float[]", 1.0, "output = offset + scale * tanh(...): a number "
              "or one per column"),
        Param("head.offset", "float|float[]", 0.0, "see head.scale"),
        Param("head.mlp_ratio", int, 1, "hidden width / model width; 0 = one linear layer", min=0),
    ),
    "tokens": (
        Param("head.temperature", float, 0.0, "0 = greedy", min=0.0),
        Param("head.top_p", float, 1.0, "nucleus sampling mass", min=0.0, max=1.0),
        Param("head.max_new_tokens", int, 32, "longest answer", min=1),
        Param("head.seed", int, None, "sampler seed (default model.seed)", min=0),
    ),
}
LIVE = frozenset(p.name for p in SCHEMA if p.live)


def input_keys(encoder: str | None) -> tuple[Param, ...]:
    return INPUT_KEYS + ENCODER_KEYS.get(encoder or "", ())


def stream_keys(head: str | None) -> tuple[Param, ...]:
    return STREAM_KEYS + HEAD_KEYS.get(head or "continuous", ())


# -- the parsed configuration -----------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    name: str
    topic: str
    type: str                    # "sensor_msgs/msg/Image"
    encoder: dict                # {"encoder": kind, option: value, ...}, for policy.encoders
    qos: str = "sensor_data"
    qos_depth: int = 5


@dataclass(frozen=True)
class StreamSpec:
    name: str
    trigger: str                 # input that triggers queries ("" for forked / loaded streams)
    context: tuple[str, ...]     # inputs that only add context
    head: dict                   # {"kind": ..., option: value}
    queue: str = "latest"        # latest | fifo
    queue_depth: int = 8
    max_age_ms: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    config_file: str = "config/models/default_qwen3_5.json"
    path: str = ""
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    max_context: int = 4096
    chunk_size: int = 64
    cuda_graphs: bool = True
    cuda_step: str = "lean-cuda+step"
    policy_weights: str = ""
    backend: str = "torch"
    threads: int = 0


@dataclass(frozen=True)
class CapsuleConfig:
    history_depth: int = 8
    context_policy: str = "rebase"
    rebase_window: int = 8
    directory: str = ""
    persist_on_commit: bool = False
    reload_at_start: bool = False
    device_budget_mb: float = 0.0
    host_budget_mb: float = 0.0
    file_budget_mb: float = 0.0
    accept_other_execution: bool = False
    verify_every: int = 0


@dataclass(frozen=True)
class QueriesConfig:
    context_wait_ms: float = 100.0


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
    autostart: bool = True
    queries: QueriesConfig = QueriesConfig()

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
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {'.'.join(parts[:-1])} is a value, not a section")
        node[parts[-1]] = value
    return out


def flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of ``nest``: nested sections -> dotted names."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# Parameters rclpy and its libraries declare on every node (or on ours): not this schema's.
ROS_MANAGED = ("use_sim_time", "start_type_description_service")
ROS_MANAGED_PREFIXES = ("qos_overrides.", "diagnostic_updater.")


def ros_managed(name: str) -> bool:
    return name in ROS_MANAGED or name.startswith(ROS_MANAGED_PREFIXES)


def expected_names(flat: Mapping[str, Any]) -> list[Param]:
    """Every parameter the node declares for these values: the node-level schema plus, for each
    listed input and stream, its keys (which depend on its encoder / head kind). Parameters are
    returned with full dotted names."""
    out = list(SCHEMA)
    for name in _as_names(flat.get("inputs.names")):
        for p in input_keys(flat.get(f"inputs.{name}.encoder")):
            out.append(_prefixed(p, f"inputs.{name}."))
    for name in _as_names(flat.get("streams.names")):
        for p in stream_keys(flat.get(f"streams.{name}.head.kind")):
            out.append(_prefixed(p, f"streams.{name}."))
    return out


def _prefixed(p: Param, prefix: str) -> Param:
    return Param(prefix + p.name, p.type, p.default, p.description, p.choices, p.min, p.max,
                 p.live, p.required)


def _as_names(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def from_params(params: Mapping[str, Any]) -> NodeConfig:
    """Validate parameters (nested as in the YAML, or flat dotted ROS names) into a NodeConfig.
    Unknown keys, wrong types, values out of range or not among the choices: ConfigError."""
    flat = {k: v for k, v in flatten(params).items() if not ros_managed(k)}
    known = {p.name: p for p in expected_names(flat)}
    for name, p in known.items():  # the kinds first: they decide which other keys exist
        if name.endswith((".encoder", ".head.kind")) and name in flat:
            p.check(flat[name], "")
    unknown = sorted(k for k in flat if k not in known)
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown}; {_hint(unknown[0], known)}")
    values = {name: p.check(flat.get(name, p.default), "") for name, p in known.items()}

    inputs_names = values["inputs.names"]
    streams_names = values["streams.names"]
    for what, names in (("inputs", inputs_names), ("streams", streams_names)):
        if not names:
            raise ConfigError(f"{what}.names must list at least one {what[:-1]}")
        if len(set(names)) != len(names):
            raise ConfigError(f"{what}.names has duplicates: {names}")

    inputs = {}
    for name in inputs_names:
        sec = _section(values, f"inputs.{name}.")
        if sec["type"].count("/") != 2:
            raise ConfigError(f"inputs.{name}.type must look like pkg/msg/Name, not {sec['type']!r}")
        options = {k: v for k, v in sec.items()
                   if k not in ("topic", "type", "qos", "qos_depth") and v is not None}
        inputs[name] = InputSpec(name, sec["topic"], sec["type"], options, sec["qos"], sec["qos_depth"])

    streams = {}
    for name in streams_names:
        sec = _section(values, f"streams.{name}.")
        if sec["trigger"] not in inputs:
            raise ConfigError(f"streams.{name}.trigger {sec['trigger']!r} is not one of "
                              f"inputs.names {inputs_names}")
        context = tuple(sec["context"] or ())
        for c in context:
            if c not in inputs:
                raise ConfigError(f"streams.{name}.context names {c!r}, not one of inputs.names "
                                  f"{inputs_names}")
        head = {k[len("head."):]: v for k, v in sec.items() if k.startswith("head.") and v is not None}
        if "columns" in head and len(head["columns"]) != head["dof"]:
            raise ConfigError(f"streams.{name}.head.columns has {len(head['columns'])} names for "
                              f"dof {head['dof']}")
        streams[name] = StreamSpec(name, sec["trigger"], context, head, sec["queue"],
                                   sec["queue_depth"], sec["max_age_ms"])

    model = ModelConfig(**_section(values, "model."))
    capsules = CapsuleConfig(**_section(values, "capsules."))
    act = _section(values, "actuation.")
    enabled = act.pop("enabled")
    actuation = ActuationConfig(enabled, {k: v for k, v in act.items() if v is not None})
    return NodeConfig(inputs, streams, model, capsules, actuation, values["autostart"],
                      QueriesConfig(**_section(values, "queries.")))


def _section(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}


def _hint(name: str, known: Mapping[str, Param]) -> str:
    section = name.rsplit(".", 1)[0] + "." if "." in name else ""
    near = sorted(k[len(section):] for k in known if k.startswith(section) and
                  "." not in k[len(section):])
    return f"known in {section or 'the top level'}: {near}" if near else "no such section"


def load_yaml(path: str | Path, node_name: str = NODE_NAME) -> NodeConfig:
    """The same config from a ROS 2 parameter file (``<node>: ros__parameters: ...``)."""
    return from_params(yaml_params(path, node_name))


def yaml_params(path: str | Path, node_name: str = NODE_NAME) -> dict:
    """The ``ros__parameters`` of ``node_name`` in a ROS 2 parameter file."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    # Keys as rcl matches them: the node name, a wildcard namespace, or every node.
    for key in (node_name, f"/{node_name}", f"/**/{node_name}", "/**"):
        if key in doc:
            return dict((doc[key] or {}).get("ros__parameters", {}))
    raise ConfigError(f"{path}: no section for node {node_name!r} (nor /**/{node_name} or /**)")


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
    """A relative config path (model configs, weights) is relative to the package root."""
    if not path:
        return path
    p = Path(path)
    return str(p if p.is_absolute() else package_root() / p)
