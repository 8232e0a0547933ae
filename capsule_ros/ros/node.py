"""capsule_node: subscribes to the configured inputs, answers each trigger on ~/actions.

Thin on purpose: parameters are declared from the params file, callbacks hand each message to
the pipeline (capsule_ros.runtime.pipeline), and outcomes are converted to messages here. The
node knows nothing of buffers or capsules beyond the verbs of the ``~/capsule`` service.

Topics and services (relative to the node):
  ~/actions  capsule_ros/msg/ActionChunk   one per answered query of a continuous-head stream
  ~/text     capsule_ros/msg/TextChunk     one per answered query of a token-head stream
  ~/joint_trajectory trajectory_msgs/JointTrajectory  only with actuation.enabled (see below)
  ~/status   capsule_ros/msg/Status        bad input, refused restores, context policy, ...
  ~/query    capsule_ros/msg/Query         explicit query on a stream (unknown stream -> Status)
  ~/capsule  capsule_ros/srv/CapsuleOp     list, stats, rollback, reset, fork, pin, unpin, drop
  /diagnostics diagnostic_msgs/DiagnosticArray, once a second

Actuation (off by default; ``actuation.enabled: true`` turns it on): the continuous actions of
``actuation.stream`` also go out as a JointTrajectory, through ``ActuationGuard`` (limits,
staleness, rate cap; every clamp or drop is a coded Status on ~/status). Parameters (parallel
lists, since ROS parameters hold no dicts):
  actuation.stream           the stream (continuous head, dof = len(joint_names))
  actuation.joint_names      [j0, j1, ...]
  actuation.position_limits  [lo0, hi0, lo1, hi1, ...] (2 per joint; omit for none)
  actuation.velocity_limits  [v0, v1, ...] rad/s or m/s (1 per joint; omit for none)
  actuation.mode             clamp | reject              (default clamp)
  actuation.max_age_ms       trigger stamp vs node clock (default 200)
  actuation.max_rate_hz      cap on passed commands      (default 0 = none)
  actuation.frame_id         header.frame_id of the trajectory (default "")
When disabled the trajectory publisher is not even created.
"""
from __future__ import annotations

import array
import json
import statistics
import sys
from dataclasses import dataclass
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from capsule_ros.msg import ActionChunk, Query, Status, TextChunk
from capsule_ros.srv import CapsuleOp

from ..capsule import CapsuleError
from ..config import NODE_NAME, ConfigError, NodeConfig, from_params
from ..policy.heads import ContinuousActionHead
from ..policy.safety import ActuationGuard
from ..runtime.engine import stats as engine_stats
from ..runtime.pipeline import failure_from, ActionOutput, Answer, Failure, Outcome, Pipeline
from ..status_codes import CapsuleRosError, Code
from .convert import import_type, time_msg, to_action_chunk, to_status, to_text_chunk

ANSWER_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                        history=HistoryPolicy.KEEP_LAST)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (array.array, tuple)) else value


ACTUATION_KEYS = ("stream", "joint_names", "position_limits", "velocity_limits", "mode",
                  "max_age_ms", "max_rate_hz", "frame_id")


@dataclass
class Actuation:
    stream: str
    joint_names: list[str]
    guard: ActuationGuard
    frame_id: str = ""


def build_actuation(config: NodeConfig, heads: dict[str, Any]) -> Actuation | None:
    """The actuation section as a guard, or None when disabled. Mistakes are ConfigErrors."""
    if not config.actuation.enabled:
        return None
    opts = dict(config.actuation.options)
    unknown = sorted(set(opts) - set(ACTUATION_KEYS))
    if unknown:
        raise ConfigError(f"actuation: unknown parameter(s) {unknown}; known: {list(ACTUATION_KEYS)}")
    stream = str(opts.get("stream", ""))
    if stream not in config.streams:
        raise ConfigError(f"actuation.stream {stream!r} is not a configured stream")
    head = heads[stream]
    if not isinstance(head, ContinuousActionHead):
        raise ConfigError(f"actuation.stream {stream!r} has no continuous head")
    joints = [str(j) for j in opts.get("joint_names") or []]
    if len(joints) != head.dof:
        raise ConfigError(f"actuation.joint_names has {len(joints)} names, stream {stream!r} "
                          f"has dof {head.dof}")
    pos = [float(v) for v in opts.get("position_limits") or []]
    if pos and len(pos) != 2 * len(joints):
        raise ConfigError(f"actuation.position_limits needs lo, hi per joint ({2 * len(joints)} "
                          f"values), got {len(pos)}")
    vel = [float(v) for v in opts.get("velocity_limits") or []]
    if vel and len(vel) != len(joints):
        raise ConfigError(f"actuation.velocity_limits needs one value per joint ({len(joints)}), "
                          f"got {len(vel)}")
    try:
        guard = ActuationGuard(
            joints,
            position_limits={j: (pos[2 * i], pos[2 * i + 1]) for i, j in enumerate(joints)} if pos else None,
            velocity_limits=dict(zip(joints, vel)) if vel else None,
            mode=str(opts.get("mode", "clamp")),
            max_age_ms=float(opts.get("max_age_ms", 200.0)),
            max_rate_hz=float(opts.get("max_rate_hz", 0.0)))
    except ValueError as e:
        raise ConfigError(f"actuation: {e}") from e
    return Actuation(stream, joints, guard, str(opts.get("frame_id", "")))


class CapsuleNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, automatically_declare_parameters_from_overrides=True, **kwargs)
        names = self.list_parameters([], 0).names
        params = {n: _plain(self.get_parameter(n).value) for n in names if n != "use_sim_time"}
        self.config = from_params(params)
        self.pipeline = Pipeline.build(self.config)
        self.get_logger().info(self.pipeline.describe())
        if not self.pipeline.policy_weights_loaded:
            self.get_logger().warning("encoder and head weights are seeded random: no "
                                      "policy.safetensors was given, actions mean nothing")
        self.errors: dict[str, int] = {name: 0 for name in self.config.streams}
        self.actions_pub = self.create_publisher(ActionChunk, "~/actions", ANSWER_QOS)
        self.text_pub = self.create_publisher(TextChunk, "~/text", ANSWER_QOS)
        self.status_pub = self.create_publisher(Status, "~/status", ANSWER_QOS)
        self.actuation = build_actuation(self.config, self.pipeline.heads)
        self.trajectory_pub = None
        if self.actuation is not None:
            from trajectory_msgs.msg import JointTrajectory
            self.trajectory_pub = self.create_publisher(JointTrajectory, "~/joint_trajectory",
                                                        ANSWER_QOS)
            self.get_logger().warning(
                f"actuation ENABLED: stream {self.actuation.stream!r} -> ~/joint_trajectory "
                f"(joints {self.actuation.joint_names}, mode {self.actuation.guard.mode})")
        # Context inputs subscribe before triggers: rclpy's executor serves ready subscriptions
        # in creation order, so a context message that arrived with a trigger is taken first.
        triggers = {s.trigger for s in self.config.streams.values()}
        ordered = sorted(self.config.inputs.values(), key=lambda i: i.name in triggers)
        self._subs = [self._subscribe(spec) for spec in ordered]
        self.create_subscription(Query, "~/query", self._on_query, ANSWER_QOS)
        self.create_service(CapsuleOp, "~/capsule", self._on_capsule_op)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0, self._publish_diagnostics)

    def _subscribe(self, spec) -> Any:
        msg_type = import_type(spec.type)
        reliability = spec.encoder.get("reliability", "reliable")
        qos = QoSProfile(depth=spec.qos_depth, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort"
                         else ReliabilityPolicy.RELIABLE)
        return self.create_subscription(
            msg_type, spec.topic, lambda msg, name=spec.name: self._on_input(name, msg), qos)

    # -- callbacks: hand on to the pipeline ---------------------------------------------------
    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _on_input(self, input_name: str, msg: Any) -> None:
        self.pipeline.on_message(input_name, msg, self._now_ns(), self._publish)

    def _on_query(self, msg: Query) -> None:
        instruction = None
        if msg.instruction:
            text = [e for e in self.pipeline.encoders.values() if getattr(e, "kind", "") == "text"]
            if not text:
                self._publish(Failure(msg.stream, msg.request_id, Code.BAD_INPUT,
                                      "no text input is configured for instructions"))
                return
            try:
                instruction = text[0].encode(msg)
            except CapsuleRosError as e:
                self._publish(Failure(msg.stream, msg.request_id, e.code, e.text))
                return
        self.pipeline.query(msg.stream, msg.request_id, instruction, self._now_ns(), self._publish)

    def _publish(self, outcome: Outcome) -> None:
        if isinstance(outcome, Answer):
            if isinstance(outcome.output, ActionOutput):
                self.actions_pub.publish(to_action_chunk(outcome))
                if self.actuation is not None and outcome.stream == self.actuation.stream:
                    self._actuate(outcome)
            else:
                self.text_pub.publish(to_text_chunk(outcome))
            return
        if outcome.stream in self.errors and outcome.code >= 100 and outcome.code < 300:
            self.errors[outcome.stream] += 1
        log = self.get_logger().warning if outcome.code < 900 else self.get_logger().error
        log(f"[{outcome.stream}#{outcome.request_id}] {Code(outcome.code).name}: {outcome.text}")
        self.status_pub.publish(to_status(outcome, self._now_ns()))

    def _actuate(self, answer: Answer) -> None:
        """The guard's verdict on a continuous answer: a JointTrajectory, and/or coded Status."""
        from .trajectory import to_joint_trajectory

        act = self.actuation
        now_ns = self._now_ns()
        result = act.guard.check(answer.output.values, answer.output.step_period,
                                 observation_age_ms=(now_ns - answer.stamp_ns) / 1e6,
                                 now_s=now_ns / 1e9)
        for code, text in result.events:
            self._publish(Failure(answer.stream, answer.request_id, code, text))
        if result.command is not None:
            self.trajectory_pub.publish(to_joint_trajectory(
                result.command, act.joint_names, answer.output.step_period,
                time_msg(answer.stamp_ns), act.frame_id))

    def _on_capsule_op(self, request: CapsuleOp.Request, response: CapsuleOp.Response):
        engine = self.pipeline.engine
        op, stream = request.op, request.stream
        try:
            if op == "list":
                response.names = engine.store.list()
            elif op == "stats":
                response.json = json.dumps(engine_stats(engine))
            elif op == "rollback":
                engine.rollback(stream, request.count or 1)
            elif op == "reset":
                engine.reset(stream)
            elif op == "fork":
                self.pipeline.fork(stream, request.target)
            elif op in ("pin", "unpin"):
                engine.store.pin(stream, op == "pin")
            elif op == "drop":
                if stream in self.config.streams and self.config.streams[stream].trigger:
                    raise CapsuleError(f"{stream!r} is a configured stream; reset it instead")
                engine.drop(stream)
            elif op == "save":
                response.json = json.dumps({"path": self.pipeline.save(stream, request.target)})
            elif op == "load":
                self.pipeline.load(stream, request.target or stream)
            else:
                raise CapsuleRosError(Code.BAD_INPUT, f"unknown op {op!r}")
        except (CapsuleError, CapsuleRosError) as e:
            failure = failure_from(stream, 0, e)
            response.ok, response.code, response.message = False, int(failure.code), failure.text
            self.get_logger().warning(f"~/capsule {op} {stream!r}: {failure.text}")
            return response
        response.ok, response.code = True, 0
        at = f"; {stream} at {engine.store.position(stream)}" if stream in engine.store else ""
        response.message = f"{op} ok{at}"
        return response

    def _publish_diagnostics(self) -> None:
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        for name, rows in self.pipeline.latencies.items():
            st = DiagnosticStatus(name=f"{self.get_name()}: stream {name}", hardware_id="capsule_ros")
            st.level = DiagnosticStatus.OK
            st.message = f"{len(rows)} queries, {self.errors.get(name, 0)} input errors"
            values = {"queries": len(rows), "errors": self.errors.get(name, 0)}
            # position() reads no capsule back from a lower tier
            values["position"] = self.pipeline.engine.store.position(name)
            for part in ("restore_ms", "append_ms", "act_ms", "commit_ms"):
                if rows:
                    values[f"{part}_p50"] = round(statistics.median(r[part] for r in rows), 3)
            st.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
            arr.status.append(st)
        self.diag_pub.publish(arr)


def main(argv: list[str] | None = None) -> int:
    rclpy.init(args=argv if argv is not None else sys.argv)
    node = None
    try:
        node = CapsuleNode()
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    except Exception as e:  # a config or model error: say it plainly, exit non-zero
        print(f"capsule_node: {e}", file=sys.stderr)
        return 1
    finally:
        if node is not None:
            node.pipeline.close()  # flush queued capsule writes
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
