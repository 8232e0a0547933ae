"""An action chunk as a ``trajectory_msgs/JointTrajectory`` (only when ``actuation.enabled``).

Call it with the command ``ActuationGuard.check`` passed, never with a raw head output.
Timing: ``header.stamp`` is the trigger observation's stamp (the chunk's start, where the robot's
state is the implicit first point) and row ``i`` gets ``time_from_start = (i + 1) * step_period``:
the first target is one period after the start, so the controller has a period to reach it
instead of being asked to be there at once. Only positions are filled; velocities and
accelerations are left empty so the controller interpolates (see ``policy/safety.py``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from builtin_interfaces.msg import Duration, Time
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint


def _duration(seconds_ns: int) -> Duration:
    return Duration(sec=seconds_ns // 1_000_000_000, nanosec=seconds_ns % 1_000_000_000)


def to_joint_trajectory(positions: np.ndarray, joint_names: Sequence[str], step_period: float,
                        stamp: Time, frame_id: str = "") -> JointTrajectory:
    """``positions`` ``[horizon, dof]`` (dof = len(joint_names)) -> JointTrajectory."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != len(joint_names):
        raise ValueError(f"positions {list(positions.shape)} do not match {len(joint_names)} joints")
    if not step_period > 0:
        raise ValueError(f"step_period must be positive, got {step_period}")
    msg = JointTrajectory()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.joint_names = [str(j) for j in joint_names]
    period_ns = round(step_period * 1e9)  # integer ns, so step i is exactly (i + 1) periods
    msg.points = [JointTrajectoryPoint(positions=row.tolist(),
                                       time_from_start=_duration((i + 1) * period_ns))
                  for i, row in enumerate(positions)]
    return msg
