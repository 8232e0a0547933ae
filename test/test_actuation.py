"""Actuation through the node: JointTrajectory fields, limits, staleness, rate cap; off by default."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

rclpy = pytest.importorskip("rclpy")

from builtin_interfaces.msg import Time  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from capsule_ros.config import ConfigError, from_params  # noqa: E402
from capsule_ros.models.registry import tiny_config  # noqa: E402
from capsule_ros.msg import ActionChunk, Status  # noqa: E402
from capsule_ros.ros.node import ANSWER_QOS, CapsuleNode, build_actuation  # noqa: E402
from capsule_ros.ros.trajectory import to_joint_trajectory  # noqa: E402
from capsule_ros.status_codes import Code  # noqa: E402
from rosutil import activate  # noqa: E402

JOINTS = ["a", "b"]
TRAJ = "/capsule_node/joint_trajectory"
pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("one_torch_thread")]  # tiny models




def params(actuation: dict | None = None) -> dict:
    return {
        "model": {"config_file": str(tiny_config("lfm2")), "seed": 0, "max_context": 128},
        "inputs": {"names": ["joints"],
                   "joints": {"topic": "/joint_states", "type": "sensor_msgs/msg/JointState",
                              "encoder": "joint_state", "joints": JOINTS}},
        "streams": {"names": ["arm"],
                    "arm": {"trigger": "joints",
                            "head": {"kind": "continuous", "horizon": 4, "dof": 2,
                                     "step_period": 0.05, "scale": 1.0}}},
        **({"actuation": actuation} if actuation is not None else {}),
    }


ENABLED = {"enabled": True, "stream": "arm", "joint_names": JOINTS,
           "position_limits": [-0.01, 0.01, -0.02, 0.02], "velocity_limits": [5.0, 5.0],
           "mode": "clamp", "max_age_ms": 1000.0, "max_rate_hz": 0.2, "frame_id": "base"}


def _overrides(doc: dict, prefix: str = "") -> list:
    out = []
    for k, v in doc.items():
        if isinstance(v, dict):
            out += _overrides(v, f"{prefix}{k}.")
        else:
            out.append(Parameter(f"{prefix}{k}", value=v))
    return out


def test_joint_trajectory_fields():
    pos = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    msg = to_joint_trajectory(pos, JOINTS, 0.1, Time(sec=5, nanosec=7), "base")
    assert msg.header.stamp == Time(sec=5, nanosec=7) and msg.header.frame_id == "base"
    assert list(msg.joint_names) == JOINTS
    assert [list(p.positions) for p in msg.points] == pos.tolist()
    assert [(p.time_from_start.sec, p.time_from_start.nanosec) for p in msg.points] == [
        (0, 100_000_000), (0, 200_000_000), (0, 300_000_000)]
    assert all(len(p.velocities) == 0 for p in msg.points)
    with pytest.raises(ValueError):
        to_joint_trajectory(pos, ["a"], 0.1, Time())


def test_actuation_parameters_validated():
    from capsule_ros.policy.heads import ContinuousActionHead
    heads = {"arm": ContinuousActionHead(8, 4, 2, 0.05, seed=0)}
    assert build_actuation(from_params(params()), heads) is None  # disabled by default
    act = build_actuation(from_params(params(ENABLED)), heads)
    assert act.stream == "arm" and act.frame_id == "base"
    assert act.guard.lo.tolist() == [-0.01, -0.02] and act.guard.vmax.tolist() == [5.0, 5.0]
    for bad in ({"stream": "nope"}, {"joint_names": ["a"]}, {"position_limits": [0.0, 1.0]},
                {"velocity_limits": [1.0]}, {"mode": "yolo"}, {"max_age": 3.0},
                {"position_limits": [1.0, -1.0, 0.0, 1.0]}):
        with pytest.raises(ConfigError):
            build_actuation(from_params(params({**ENABLED, **bad})), heads)




class Harness:
    """The node on sim time driven by the test's /clock: staleness and the rate cap are judged
    against a clock that only the test moves, so how long a query takes changes nothing."""

    def __init__(self, ctx, doc):
        overrides = _overrides(doc) + [Parameter("use_sim_time", value=True)]
        self.node = activate(CapsuleNode(context=ctx, parameter_overrides=overrides))
        self.client = rclpy.create_node("client", context=ctx)
        self.executor = SingleThreadedExecutor(context=ctx)
        self.executor.add_node(self.node)
        self.executor.add_node(self.client)
        self.chunks, self.status, self.traj = [], [], []
        c = self.client
        c.create_subscription(ActionChunk, "/capsule_node/actions", self.chunks.append, ANSWER_QOS)
        c.create_subscription(Status, "/capsule_node/status", self.status.append, ANSWER_QOS)
        c.create_subscription(JointTrajectory, TRAJ, self.traj.append, ANSWER_QOS)
        self.pub = c.create_publisher(JointState, "/joint_states", 10)
        self.clock = c.create_publisher(Clock, "/clock", 10)
        self.now_s = 1000
        assert self.spin_until(lambda: self.pub.get_subscription_count() > 0
                               and self.clock.get_subscription_count() > 0
                               and self.node.actions_pub.get_subscription_count() > 0
                               and self.node.status_pub.get_subscription_count() > 0)

    def spin_until(self, cond, timeout=20.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return True
            self.executor.spin_once(timeout_sec=0.05)
        return cond()

    def tick(self, seconds: int) -> None:
        """Move the node's (sim) clock forward and wait until the node has seen it."""
        self.now_s += seconds
        self.clock.publish(Clock(clock=Time(sec=self.now_s)))
        want = self.now_s * 10**9
        assert self.spin_until(lambda: self.node.get_clock().now().nanoseconds == want)

    def send(self, age_s: float = 0.0) -> None:
        """A joint state stamped ``age_s`` before the node's clock; waits for its ActionChunk."""
        n = len(self.chunks)
        stamp = self.now_s * 10**9 - int(age_s * 1e9)
        msg = JointState(name=JOINTS, position=[0.1, -0.2])
        msg.header.stamp = Time(sec=stamp // 10**9, nanosec=stamp % 10**9)
        self.pub.publish(msg)
        assert self.spin_until(lambda: len(self.chunks) > n)

    def close(self):
        self.executor.shutdown()
        self.client.destroy_node()
        self.node.destroy_node()


def test_limits_staleness_and_rate_through_node(ros):
    h = Harness(ros, params(ENABLED))
    try:
        assert h.spin_until(lambda: h.node.trajectory_pub.get_subscription_count() > 0)
        h.tick(1)
        h.send()
        assert h.spin_until(lambda: len(h.traj) == 1)
        (traj,) = h.traj
        chunk = h.chunks[-1]
        assert list(traj.joint_names) == JOINTS and traj.header.frame_id == "base"
        assert traj.header.stamp == chunk.header.stamp  # the trigger's stamp
        assert len(traj.points) == chunk.horizon == 4
        assert traj.points[2].time_from_start.nanosec == 150_000_000
        pos = np.array([p.positions for p in traj.points])
        assert np.all(np.abs(pos) <= np.array([0.01, 0.02]) + 1e-12)
        raw = np.array(chunk.values).reshape(4, 2)
        assert np.abs(raw).max() > 0.02  # the head's output really was outside the limits
        clamped = [s for s in h.status if s.code == Code.ACTION_CLAMPED]
        assert h.spin_until(lambda: any(s.code == Code.ACTION_CLAMPED for s in h.status))
        clamped = [s for s in h.status if s.code == Code.ACTION_CLAMPED]
        assert clamped and all(s.stream == "arm" and s.request_id == 1 for s in clamped)

        h.status.clear()
        h.tick(1)
        h.send()  # one (sim) second after the first: the rate cap (0.2 Hz) drops it
        assert h.spin_until(lambda: any(s.code == Code.RATE_LIMITED for s in h.status))
        h.status.clear()
        h.tick(10)  # past the rate cap's 5 s
        h.send(age_s=5.0)  # older than max_age_ms
        assert h.spin_until(lambda: any(s.code == Code.STALE_OBSERVATION for s in h.status))
        assert [s.request_id for s in h.status if s.code == Code.STALE_OBSERVATION] == [3]
        h.tick(10)
        h.send()   # fresh and past the rate cap: passes (and orders the check below after it)
        assert h.spin_until(lambda: any(t.header.stamp.sec == h.now_s for t in h.traj))
        assert len(h.traj) == 2 and len(h.chunks) == 4  # chunks always, commands when passed
    finally:
        h.close()


def test_disabled_by_default_no_trajectory_traffic(ros):
    h = Harness(ros, params())
    try:
        assert h.node.actuation is None and h.node.trajectory_pub is None
        assert h.client.count_publishers(TRAJ) == 0
        h.send()
        h.send()
        assert len(h.chunks) == 2 and h.traj == []
        assert not any(s.code >= 500 and s.code < 600 for s in h.status)
    finally:
        h.close()
