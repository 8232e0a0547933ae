"""capsule_node: a managed (lifecycle) node that answers each trigger of a stream on ~/actions.

Lifecycle (``rclpy.lifecycle``; ``autostart: true``, the default, walks to active by itself):
  configure   validate every parameter (a mistake names the parameter and what it accepts, and
              the node stays unconfigured), build or load the model, put encoders and heads on
              its device, check the GPU memory the capsule budgets need, reload persisted
              capsules, and warm up: every CUDA graph the configuration can reach is captured and
              run once here, so nothing is captured or compiled while serving.
  activate    subscribe to the inputs (sensor-data QoS unless an input says ``qos: reliable``;
              ``qos_overrides.<topic>.subscription.*`` honoured) and ``~/query``; serve.
  deactivate  unsubscribe; capsules, model and ``~/capsule`` stay.
  cleanup     free the model, its live state and every capsule (GPU memory too).
  shutdown    flush queued capsule writes.

Topics and services (relative to the node):
  ~/actions  capsule_ros/msg/ActionChunk   one per answered query of a continuous-head stream
  ~/text     capsule_ros/msg/TextChunk     one per answered query of a token-head stream
  ~/joint_trajectory trajectory_msgs/JointTrajectory  with an actuation section (see config/)
  ~/status   capsule_ros/msg/Status        bad input, refused restores, context policy, ...
  ~/query    capsule_ros/msg/Query         explicit query on a stream (unknown stream -> Status)
  ~/capsule  capsule_ros/srv/CapsuleOp     list, stats, rollback, reset, fork, pin, unpin, drop,
                                           save, load (from configure to cleanup)
  /diagnostics diagnostic_msgs/DiagnosticArray (from configure to cleanup)

Parameters are declared with descriptors (``ros2 param describe``); their one home is
``capsule_ros.config``. Structural ones change only while unconfigured; live ones
(``capsule_ros.config.LIVE``) apply at once.
"""
from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass
from typing import Any

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import (HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data)
from rclpy.qos_overriding_options import QoSOverridingOptions

from capsule_ros.msg import ActionChunk, Query, Status, TextChunk
from capsule_ros.srv import CapsuleOp

from ..capsule import CapsuleError
from ..config import NODE_NAME, ConfigError, NodeConfig
from ..doctor import failed, run_checks
from ..policy.heads import ContinuousActionHead
from ..policy.safety import ActuationGuard
from ..runtime.build import build_pipeline
from ..runtime.outcome import ActionOutput, Answer, Failure, Outcome
from ..runtime.pipeline import Pipeline, failure_from
from ..status_codes import CapsuleRosError, Code
from .convert import import_type, time_msg, to_action_chunk, to_status, to_text_chunk
from .diagnostics import Diagnostics
from .params import NodeParameters

BUDGETS = ("capsules.device_budget_mb", "capsules.host_budget_mb", "capsules.file_budget_mb")
ANSWER_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                        history=HistoryPolicy.KEEP_LAST)


@dataclass
class Actuation:
    stream: str
    joint_names: list[str]
    guard: ActuationGuard
    frame_id: str = ""


def build_actuation(config: NodeConfig, heads: dict[str, Any]) -> Actuation | None:
    """The actuation section as a guard (None when no stream is named). Mistakes are
    ConfigErrors. Built whenever a stream is named, so ``actuation.enabled`` can go live."""
    opts = dict(config.actuation.options)
    stream = str(opts.get("stream", ""))
    if not stream:
        if config.actuation.enabled:
            raise ConfigError("actuation.enabled needs actuation.stream (a continuous stream)")
        return None
    if stream not in config.streams:
        raise ConfigError(f"actuation.stream {stream!r} is not one of streams.names "
                          f"{list(config.streams)}")
    head = heads[stream]
    if not isinstance(head, ContinuousActionHead):
        raise ConfigError(f"actuation.stream {stream!r} has no continuous head")
    joints = list(opts.get("joint_names") or [])
    if len(joints) != head.dof:
        raise ConfigError(f"actuation.joint_names has {len(joints)} names, stream {stream!r} "
                          f"has dof {head.dof}")
    pos = list(opts.get("position_limits") or [])
    if pos and len(pos) != 2 * len(joints):
        raise ConfigError(f"actuation.position_limits needs lo, hi per joint ({2 * len(joints)} "
                          f"values), got {len(pos)}")
    vel = list(opts.get("velocity_limits") or [])
    if vel and len(vel) != len(joints):
        raise ConfigError(f"actuation.velocity_limits needs one value per joint ({len(joints)}), "
                          f"got {len(vel)}")
    try:
        guard = ActuationGuard(
            joints,
            position_limits={j: (pos[2 * i], pos[2 * i + 1]) for i, j in enumerate(joints)} if pos else None,
            velocity_limits=dict(zip(joints, vel)) if vel else None,
            mode=opts.get("mode", "clamp"),
            max_age_ms=opts.get("max_age_ms", 200.0),
            max_rate_hz=opts.get("max_rate_hz", 0.0))
    except ValueError as e:
        raise ConfigError(f"actuation: {e}") from e
    return Actuation(stream, joints, guard, opts.get("frame_id", ""))


def input_qos(spec: Any) -> QoSProfile:
    """REP-2003: sensor inputs subscribe best effort (what camera drivers publish; a reliable
    publisher matches too), keep last ``qos_depth``; ``qos: reliable`` for inputs that must not drop."""
    if spec.qos == "reliable":
        return QoSProfile(depth=spec.qos_depth, history=HistoryPolicy.KEEP_LAST,
                          reliability=ReliabilityPolicy.RELIABLE)
    qos = QoSProfile(**{k: getattr(qos_profile_sensor_data, k) for k in
                        ("history", "reliability", "durability")}, depth=spec.qos_depth)
    return qos


class CapsuleNode(LifecycleNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.params = NodeParameters(self)
        self.params.declare()
        self.add_on_set_parameters_callback(self._guard_parameters)
        self.add_post_set_parameters_callback(self._apply_live)
        self.state = "unconfigured"
        self.config: NodeConfig | None = None
        self.pipeline: Pipeline | None = None
        self.actuation: Actuation | None = None
        self.diagnostics: Diagnostics | None = None
        self.configure_s: float | None = None
        self._pubs: list[Any] = []
        self._subs: list[Any] = []
        self._service = None

    # -- lifecycle ----------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        t0 = time.monotonic()
        try:
            self.params.declare()  # sections of names set while unconfigured
            self.config = self.params.config()
            self._check_environment(self.config.model.device)
            self.pipeline = build_pipeline(self.config, node_name=self.get_fully_qualified_name())
            self.get_logger().info(self.pipeline.describe())
            if not self.pipeline.policy_weights_loaded:
                self.get_logger().warning("encoder and head weights are seeded random: no "
                                          "policy.safetensors was given, actions mean nothing")
            self.pipeline.check_memory()
            self.actuation = build_actuation(self.config, self.pipeline.heads)
            warm = self.pipeline.warm_up()
            self._make_interfaces()
            self.pipeline.start(self._publish, self._now_ns)
        except ConfigError as e:
            self.get_logger().error(f"configure failed: {e}")
            self._release()
            return TransitionCallbackReturn.FAILURE
        except Exception as e:  # a model, file or GPU error: say it, stay unconfigured
            self.get_logger().error(f"configure failed: {type(e).__name__}: {e}\n"
                                    f"{traceback.format_exc()}")
            self._release()
            return TransitionCallbackReturn.FAILURE
        self.configure_s = time.monotonic() - t0
        self.state = "inactive"
        self.get_logger().info(f"configured in {self.configure_s:.2f} s ({warm})")
        return TransitionCallbackReturn.SUCCESS

    def _check_environment(self, device: str) -> None:
        """The doctor's checks (``python -m capsule_ros.doctor``) for this device: warnings are
        logged, a failed check (no kernel image for this GPU, a torch without CUDA, ...) fails
        configure with what the doctor says to do."""
        checks = run_checks(device, probes=False)
        for c in checks:
            if c.status in ("warn", "fail"):
                self.get_logger().warning(f"doctor: {c.name} {c.status}: {c.detail}")
        bad = failed(checks)
        if bad:
            raise ConfigError("; ".join(f"doctor: {c.name}: {c.detail}" for c in bad))

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._subscribe_all()
        except Exception as e:
            self.get_logger().error(f"activate failed: {type(e).__name__}: {e}")
            self._unsubscribe_all()
            return TransitionCallbackReturn.FAILURE
        self.state = "active"
        if self.actuation is not None and self.config.actuation.enabled:
            self.get_logger().warning(
                f"actuation ENABLED: stream {self.actuation.stream!r} -> ~/joint_trajectory "
                f"(joints {self.actuation.joint_names}, mode {self.actuation.guard.mode})")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._unsubscribe_all()
        # what was accepted is answered (and published) before the publishers go quiet
        if not self.pipeline.scheduler.wait_idle(timeout=30.0):
            self.get_logger().warning("deactivate: queries still running after 30 s")
        self.state = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.state = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error while leaving {state.label}: releasing everything")
        self._release()
        self.state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def _make_interfaces(self) -> None:
        """Publishers, the ~/capsule service and diagnostics: from configure to cleanup."""
        self.actions_pub = self.create_lifecycle_publisher(ActionChunk, "~/actions", ANSWER_QOS)
        self.text_pub = self.create_lifecycle_publisher(TextChunk, "~/text", ANSWER_QOS)
        self.status_pub = self.create_lifecycle_publisher(Status, "~/status", ANSWER_QOS)
        self._pubs = [self.actions_pub, self.text_pub, self.status_pub]
        self.trajectory_pub = None
        if self.actuation is not None:
            from trajectory_msgs.msg import JointTrajectory
            self.trajectory_pub = self.create_lifecycle_publisher(
                JointTrajectory, "~/joint_trajectory", ANSWER_QOS)
            self._pubs.append(self.trajectory_pub)
        self._service = self.create_service(CapsuleOp, "~/capsule", self._on_capsule_op)
        accounting = self.pipeline.scheduler.accounting
        self.diagnostics = Diagnostics(self, self.pipeline.figures, hardware_id="capsule_ros",
                                       node_values=self._node_values,
                                       stream_extra=lambda stream: accounting().get(stream, {}))
        self.diagnostics.start()

    def _release(self) -> None:
        """Everything configure made, in reverse; flushes queued capsule writes first."""
        self._unsubscribe_all()
        if self.diagnostics is not None:
            self.diagnostics.stop()
            self.diagnostics = None
        if self._service is not None:
            self.destroy_service(self._service)
            self._service = None
        for pub in self._pubs:
            self.destroy_lifecycle_publisher(pub)
        self._pubs = []
        if self.pipeline is not None:
            self.pipeline.close()  # stops the worker after the query in hand, flushes writes
            self.pipeline = None
        self.actuation = None
        _free_device_memory()

    def _subscribe_all(self) -> None:
        # context inputs first: when messages of several inputs are ready together, the
        # executor serves subscriptions in creation order, and a trigger taken before its
        # context could find the group busy and the context not looked at again in time
        # (a lockstep replay lost context when the camera was subscribed first)
        triggers = {s.trigger for s in self.config.streams.values()}
        for spec in sorted(self.config.inputs.values(), key=lambda i: i.name in triggers):
            self._subs.append(self.create_subscription(
                import_type(spec.type), spec.topic,
                lambda msg, name=spec.name: self._on_input(name, msg), input_qos(spec),
                qos_overriding_options=QoSOverridingOptions.with_default_policies()))
        self._subs.append(self.create_subscription(Query, "~/query", self._on_query, ANSWER_QOS))

    def _unsubscribe_all(self) -> None:
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []

    # -- parameters ---------------------------------------------------------------------------
    def _guard_parameters(self, params: list[Parameter]):
        result = self.params.guard(params, self.state)
        budgets = {p.name: p.value for p in params if p.name in BUDGETS}
        if result.successful and budgets and self.pipeline is not None:
            # budgets are applied here, where a refusal can still say why (all or nothing)
            values = {name: float(budgets.get(name, self.get_parameter(name).value))
                      for name in BUDGETS}
            try:
                self.pipeline.set_budgets(*(values[name] for name in BUDGETS))
            except Exception as e:
                result.successful, result.reason = False, f"budgets refused: {e}"
        return result

    def _apply_live(self, params: list[Parameter]) -> None:
        """Live parameters take effect at once (structural ones were refused unless unconfigured,
        and are read at the next configure)."""
        if self.pipeline is None:
            return
        for p in params:
            if p.name == "capsules.verify_every":
                self.pipeline.engine.verify_every = int(p.value)
            elif p.name == "actuation.enabled":
                self.config = _with_actuation(self.config, enabled=bool(p.value))
            elif p.name == "actuation.max_age_ms" and self.actuation is not None:
                self.actuation.guard.max_age_ms = float(p.value)
            elif p.name == "actuation.max_rate_hz" and self.actuation is not None:
                self.actuation.guard.min_interval_s = 1.0 / p.value if p.value > 0 else 0.0

    # -- callbacks: hand on to the pipeline ---------------------------------------------------
    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _on_input(self, input_name: str, msg: Any) -> None:
        receive_ns = self._now_ns()
        try:
            self.pipeline.on_message(input_name, msg, receive_ns)
        except Exception as e:  # nothing may end the executor: a status, and serve on
            self._callback_failed(f"input {input_name}", e)

    def _callback_failed(self, where: str, e: Exception) -> None:
        self.get_logger().error(f"{where}: {traceback.format_exc()}", throttle_duration_sec=1.0)
        self._publish(Failure("", 0, Code.INTERNAL, f"{where}: {type(e).__name__}: {e}"[:500]))

    def _on_query(self, msg: Query) -> None:
        stamp = msg.header.stamp
        receive_ns = self._now_ns()
        try:
            self.pipeline.query(msg.stream, msg.request_id, msg.instruction, msg.input,
                                stamp_ns=stamp.sec * 1_000_000_000 + stamp.nanosec,
                                receive_ns=receive_ns)
        except Exception as e:  # nothing may end the executor
            self._callback_failed("~/query", e)

    def _publish(self, outcome: Outcome) -> None:
        """What the worker returns, as messages (called from the worker thread)."""
        if isinstance(outcome, Answer):
            if isinstance(outcome.output, ActionOutput):
                self.actions_pub.publish(to_action_chunk(outcome))
                if (self.actuation is not None and self.config.actuation.enabled
                        and outcome.stream == self.actuation.stream):
                    self._actuate(outcome)
            else:
                self.text_pub.publish(to_text_chunk(outcome))
            return
        # a flood of bad messages must not flood the log: throttled, and names cut short
        log = self.get_logger().warning if outcome.code < 900 else self.get_logger().error
        where = outcome.stream or outcome.input or "-"
        log(f"[{where[:64]}#{outcome.request_id}] {Code(outcome.code).name}: {outcome.text[:300]}",
            throttle_duration_sec=1.0)
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
        """Capsule verbs. Those that change a stream run on the worker in the stream's order
        (a commit never overwrites them); file reads and writes run here. Never raises."""
        pipeline = self.pipeline
        if pipeline is None:
            response.ok, response.code = False, int(Code.BAD_INPUT)
            response.message = f"node is {self.state}: configure it first"
            return response
        op, stream = request.op, request.stream
        try:
            at = None
            if op == "list":
                response.names = pipeline.list_streams()
            elif op == "stats":
                response.json = json.dumps(pipeline.stats())
            elif op == "rollback":
                at = pipeline.rollback(stream, request.count or 1)
            elif op == "reset":
                at = pipeline.reset(stream)
            elif op == "fork":
                pipeline.fork(stream, request.target)
            elif op in ("pin", "unpin"):
                pipeline.pin(stream, op == "pin")
            elif op == "drop":
                pipeline.drop(stream)
            elif op == "save":
                response.json = json.dumps({"path": pipeline.save(stream, request.target)})
            elif op == "load":
                at = pipeline.load(stream, request.target or stream)
            else:
                raise CapsuleRosError(Code.BAD_INPUT, f"unknown op {op[:64]!r}; ops: list, stats, "
                                      f"rollback, reset, fork, pin, unpin, drop, save, load")
        except Exception as e:  # coded errors as they are; anything else is INTERNAL
            failure = (failure_from(stream, 0, e) if isinstance(e, (CapsuleError, CapsuleRosError))
                       else Failure(stream, 0, Code.INTERNAL, f"{type(e).__name__}: {e}"))
            if failure.code == Code.INTERNAL:
                self.get_logger().error(f"~/capsule {op[:64]}: {traceback.format_exc()}")
            response.ok, response.code, response.message = False, int(failure.code), failure.text
            self.get_logger().warning(f"~/capsule {op[:64]} {stream[:64]!r}: {failure.text[:300]}",
                                      throttle_duration_sec=1.0)
            return response
        response.ok, response.code = True, 0
        response.message = f"{op} ok" + (f"; {stream} at {at}" if at is not None else "")
        return response

    def _node_values(self) -> dict[str, str]:
        """Node-level figures for /diagnostics."""
        values = {"state": self.state}
        if self.pipeline is not None:
            values.update(self.pipeline.node_figures())
        if self.configure_s is not None:
            values["configure_s"] = f"{self.configure_s:.2f}"
        return values


def _with_actuation(config: NodeConfig, enabled: bool) -> NodeConfig:
    import dataclasses
    return dataclasses.replace(config, actuation=dataclasses.replace(config.actuation,
                                                                     enabled=enabled))


def _free_device_memory() -> None:
    import gc
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # no torch CUDA runtime: nothing to free
        pass


def run(args: list[str] | None = None) -> int:
    """Start, autostart if asked, spin until shut down. Called by ``capsule_ros.ros.main``,
    which has already made SIGINT/SIGTERM raise KeyboardInterrupt."""
    rclpy.init(args=args)
    node = None
    try:
        node = CapsuleNode()
        if node.get_parameter("autostart").value:
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
        # One executor thread: callbacks only validate and hand on (queries run on the worker),
        # services wait for the worker at most one query. rclpy's multi-threaded executor
        # busy-spun instead whenever a ready input's callback group was busy (it rebuilds the
        # wait set, finds the input still ready, skips it, and again): at 4 x 15 Hz 640x480 it
        # held the interpreter lock ~95% of the time and the worker answered a few queries a
        # second (py-spy; bench/README.md, "Through ROS").
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node._release()  # flush queued capsule writes
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
