"""Actuation guard (limits, staleness, rate cap, NaN) and the JointTrajectory conversion."""

from __future__ import annotations

import math

import numpy as np
import pytest

from capsule_ros.policy.safety import ActuationGuard
from capsule_ros.status_codes import Code

JOINTS = ["j0", "j1"]
PERIOD = 0.1


def guard(mode: str = "clamp", **kw) -> ActuationGuard:
    args = dict(position_limits={"j0": (-1.0, 1.0), "j1": (0.0, 2.0)},
                velocity_limits={"j0": 1.0, "j1": 5.0}, mode=mode, max_age_ms=100.0, max_rate_hz=10.0)
    args.update(kw)
    return ActuationGuard(JOINTS, **args)


def codes(result) -> list[Code]:
    return [c for c, _ in result.events]


def test_within_limits_passes_unchanged():
    cmd = np.array([[0.0, 1.0], [0.05, 1.2], [0.1, 1.4]])
    r = guard().check(cmd, PERIOD, observation_age_ms=10, now_s=0.0, current_positions=[0.0, 1.0])
    assert r.events == [] and np.array_equal(r.command, cmd) and r.command is not cmd


def test_position_limits_clamp_vs_reject():
    cmd = np.array([[0.0, 1.0], [0.05, 2.5], [0.1, 2.45]])   # j1 above 2.0 at two steps
    r = guard(velocity_limits={}).check(cmd, PERIOD, 0, 0.0)
    assert codes(r) == [Code.ACTION_CLAMPED] and "'j1'" in r.events[0][1] and "2 step" in r.events[0][1]
    assert r.command[:, 1].tolist() == [1.0, 2.0, 2.0] and r.command[:, 0].tolist() == cmd[:, 0].tolist()
    r = guard("reject", velocity_limits={}).check(cmd, PERIOD, 0, 0.0)
    assert r.command is None and r.dropped and codes(r) == [Code.ACTION_DROPPED]


def test_velocity_limits_clamp_vs_reject():
    # j0 max 1.0 rad/s -> 0.1 per step; a jump of 0.5 between steps and 0.3 from the current state
    cmd = np.array([[0.3, 1.0], [0.8, 1.0], [0.8, 1.0]])
    r = guard().check(cmd, PERIOD, 0, 0.0, current_positions=np.array([0.0, 1.0]))
    assert codes(r) == [Code.ACTION_CLAMPED] and "velocity" in r.events[0][1] and "'j0'" in r.events[0][1]
    assert r.command[:, 0] == pytest.approx([0.1, 0.2, 0.3])
    assert np.all(np.abs(np.diff(r.command[:, 0], prepend=0.0)) <= 0.1 + 1e-12)
    # without the current state, row 0 has no predecessor
    r = guard().check(cmd, PERIOD, 0, 0.0)
    assert r.command[:, 0] == pytest.approx([0.3, 0.4, 0.5])
    r = guard("reject").check(cmd, PERIOD, 0, 0.0, current_positions=[0.0, 1.0])
    assert r.command is None and codes(r) == [Code.ACTION_DROPPED]


def test_position_and_velocity_clamp_together_stay_in_limits():
    cmd = np.array([[5.0, 1.0], [5.0, 1.0]])
    r = guard().check(cmd, PERIOD, 0, 0.0, current_positions=[0.85, 1.0])
    assert codes(r) == [Code.ACTION_CLAMPED, Code.ACTION_CLAMPED]   # position, then velocity
    assert r.command[:, 0] == pytest.approx([0.95, 1.0])


def test_staleness():
    g = guard()
    cmd = np.zeros((2, 2)) + [0, 1]
    r = g.check(cmd, PERIOD, observation_age_ms=150, now_s=0.0)
    assert r.command is None and codes(r) == [Code.STALE_OBSERVATION]
    assert codes(g.check(cmd, PERIOD, -500, 0.0)) == [Code.STALE_OBSERVATION]   # stamped in the future
    assert codes(g.check(cmd, PERIOD, math.nan, 0.0)) == [Code.STALE_OBSERVATION]
    assert g.check(cmd, PERIOD, 99, 0.0).command is not None
    assert ActuationGuard(JOINTS).check(cmd, PERIOD, 1e9, 0.0).command is not None  # no limit set


def test_rate_cap():
    g = guard()  # 10 Hz -> 100 ms between passed commands
    cmd = np.zeros((2, 2)) + [0, 1]
    assert g.check(cmd, PERIOD, 0, now_s=10.0).command is not None
    r = g.check(cmd, PERIOD, 0, now_s=10.05)
    assert r.command is None and codes(r) == [Code.RATE_LIMITED]
    assert g.check(cmd, PERIOD, 0, now_s=10.1).command is not None   # the drop did not count
    assert g.check(cmd, PERIOD, 0, now_s=1.0).command is not None    # clock went back: restart
    g.reset()
    assert g.check(cmd, PERIOD, 0, now_s=1.01).command is not None


def test_nan_and_bad_shape_dropped():
    g = guard()
    cmd = np.array([[0.0, 1.0], [np.nan, 1.0]])
    r = g.check(cmd, PERIOD, 0, 0.0)
    assert r.command is None and codes(r) == [Code.ACTION_DROPPED]
    assert codes(g.check(np.zeros((2, 3)), PERIOD, 0, 0.0)) == [Code.ACTION_DROPPED]
    assert codes(g.check(np.zeros((2, 2)) + [0, 1], PERIOD, 0, 0.0,
                         current_positions=[np.inf, 0])) == [Code.ACTION_DROPPED]


def test_bad_configuration():
    with pytest.raises(ValueError, match="typo"):
        ActuationGuard(JOINTS, position_limits={"typo": (0, 1)})
    with pytest.raises(ValueError):
        ActuationGuard(JOINTS, position_limits={"j0": (1, 0)})
    with pytest.raises(ValueError):
        ActuationGuard(JOINTS, velocity_limits={"j0": 0})
    with pytest.raises(ValueError):
        ActuationGuard(JOINTS, mode="warn")


def test_joint_trajectory_fields():
    from builtin_interfaces.msg import Time

    from capsule_ros.ros.trajectory import to_joint_trajectory

    cmd = np.array([[0.0, 1.0], [0.1, 1.1], [0.2, 1.2]])
    msg = to_joint_trajectory(cmd, JOINTS, 0.4, Time(sec=12, nanosec=345), frame_id="base")
    assert msg.joint_names == JOINTS and msg.header.frame_id == "base"
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (12, 345)
    times = [(p.time_from_start.sec, p.time_from_start.nanosec) for p in msg.points]
    assert times == [(0, 400_000_000), (0, 800_000_000), (1, 200_000_000)]
    assert [list(p.positions) for p in msg.points] == cmd.tolist()
    with pytest.raises(ValueError):
        to_joint_trajectory(cmd, ["j0"], 0.4, Time())
