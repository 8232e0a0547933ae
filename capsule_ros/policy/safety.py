"""Actuation safety: the last check between an action chunk and a robot.

What a chunk means
  A continuous head answers one query with a chunk of ``horizon`` steps x ``dof`` joint position
  targets (joint order = ``joint_names``), ``step_period`` seconds apart. The chunk starts at the
  trigger observation's header stamp (receive time for headerless inputs): the robot's state at
  that stamp is the implicit step 0, and row ``i`` is the target to reach at
  ``stamp + (i + 1) * step_period``. That is why the first row's velocity is measured against
  ``current_positions`` over one period, and why the JointTrajectory points sit at
  ``time_from_start = (i + 1) * step_period`` (``capsule_ros/ros/trajectory.py``).
  Executing, interpolating and blending successive chunks (a newer chunk usually supersedes the
  tail of the previous one) is the robot controller's job, not this node's.

Off by default
  Trajectory output is disabled unless ``actuation.enabled: true``; ``ActionChunk`` messages are
  always published, commands for a robot only when enabled, and then always through this guard.

What the guard does (``ActuationGuard.check``), in order; a drop returns ``command=None``:
  1. shape ``[horizon, dof]`` and NaN/Inf in the command          -> ACTION_DROPPED
  2. observation older than ``max_age_ms`` (or stamped more than
     ``max_age_ms`` in the future: a clock mismatch)              -> STALE_OBSERVATION
  3. less than ``1 / max_rate_hz`` since the last passed command   -> RATE_LIMITED
  4. position limits per joint: ``clamp`` to [lo, hi]               -> ACTION_CLAMPED per joint
                                ``reject``                          -> ACTION_DROPPED
  5. velocity limits per joint, on differences between consecutive rows (and from
     ``current_positions`` to row 0 when given), i.e. |delta| <= v_max * step_period:
                                ``clamp`` limits each step's delta -> ACTION_CLAMPED per joint
                                ``reject``                          -> ACTION_DROPPED
  Clamping velocity walks from the previous (already limited) row towards each target, so a
  command that starts inside the position limits stays inside them. Joints without a configured
  limit are not limited; a limit naming an unknown joint is a configuration error.
  Time is passed in (``now_s``), never read here, so every rule is testable; when ``now_s`` goes
  backwards (a bag loop, a sim reset) the rate cap restarts. Only passed commands count for the
  rate cap; commands exactly 1 / max_rate_hz apart pass, so set the cap a little above the
  trigger's rate (a 10 Hz camera with a 10 Hz cap drops every frame that jitters early).
  The guard is not thread-safe: call it from one executor thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from capsule_ros.status_codes import Code

Event = tuple[Code, str]
_TIME_SLACK_S = 1e-6  # float noise in stamps must not turn an on-time command into RATE_LIMITED


@dataclass
class GuardResult:
    command: np.ndarray | None     # [horizon, dof] float64 to send, or None when dropped
    events: list[Event] = field(default_factory=list)

    @property
    def dropped(self) -> bool:
        return self.command is None


class ActuationGuard:
    def __init__(self, joint_names: Sequence[str],
                 position_limits: dict[str, tuple[float, float]] | None = None,
                 velocity_limits: dict[str, float] | None = None,
                 mode: str = "clamp", max_age_ms: float = math.inf,
                 max_rate_hz: float = 0.0) -> None:
        self.joint_names = [str(j) for j in joint_names]
        position_limits, velocity_limits = position_limits or {}, velocity_limits or {}
        if mode not in ("clamp", "reject"):
            raise ValueError(f"actuation mode must be 'clamp' or 'reject', got {mode!r}")
        for what, limits in (("position", position_limits), ("velocity", velocity_limits)):
            unknown = sorted(set(limits) - set(self.joint_names))
            if unknown:  # a typo must not silently disable a limit
                raise ValueError(f"{what} limits for unknown joint(s) {unknown}")
        dof = len(self.joint_names)
        self.lo, self.hi = np.full(dof, -np.inf), np.full(dof, np.inf)
        self.vmax = np.full(dof, np.inf)
        for j, name in enumerate(self.joint_names):
            if name in position_limits:
                lo, hi = (float(v) for v in position_limits[name])
                if not lo <= hi:
                    raise ValueError(f"position limits of '{name}': lo {lo} > hi {hi}")
                self.lo[j], self.hi[j] = lo, hi
            if name in velocity_limits:
                v = float(velocity_limits[name])
                if not v > 0:
                    raise ValueError(f"velocity limit of '{name}' must be > 0, got {v}")
                self.vmax[j] = v
        if not max_age_ms > 0:
            raise ValueError(f"max_age_ms must be > 0 (inf to disable), got {max_age_ms}")
        self.mode, self.max_age_ms = mode, float(max_age_ms)
        self.min_interval_s = 1.0 / max_rate_hz if max_rate_hz and max_rate_hz > 0 else 0.0
        self._last_pass_s: float | None = None

    def reset(self) -> None:
        """Forget the last passed command (the rate cap restarts)."""
        self._last_pass_s = None

    def check(self, positions: np.ndarray, step_period: float, observation_age_ms: float,
              now_s: float, current_positions: np.ndarray | None = None) -> GuardResult:
        """Decide what, if anything, of a chunk ``[horizon, dof]`` may be sent (see module doc)."""
        cmd = np.array(positions, dtype=np.float64)  # a copy: the caller's array is not modified
        dof = len(self.joint_names)
        if cmd.ndim != 2 or cmd.shape[1] != dof or cmd.shape[0] == 0:
            return _drop(Code.ACTION_DROPPED, f"command shape {list(cmd.shape)}, expected [horizon, {dof}]")
        if not np.isfinite(cmd).all():
            return _drop(Code.ACTION_DROPPED, "non-finite value in command")
        if not step_period > 0:
            return _drop(Code.ACTION_DROPPED, f"step_period {step_period} is not positive")
        age = float(observation_age_ms)
        if math.isnan(age) or age > self.max_age_ms or age < -self.max_age_ms:
            return _drop(Code.STALE_OBSERVATION,
                         f"observation age {age:.1f} ms outside +-{self.max_age_ms:.1f} ms")
        last = self._last_pass_s
        if last is not None and now_s >= last and now_s - last < self.min_interval_s - _TIME_SLACK_S:
            return _drop(Code.RATE_LIMITED, f"{(now_s - last) * 1e3:.1f} ms since the last command, "
                         f"minimum {self.min_interval_s * 1e3:.1f} ms")
        start = None
        if current_positions is not None:
            start = np.asarray(current_positions, dtype=np.float64).reshape(-1)
            if start.size != dof or not np.isfinite(start).all():
                return _drop(Code.ACTION_DROPPED, "current positions missing joints or non-finite")

        events: list[Event] = []
        cmd, dropped = self._positions(cmd, events)
        if not dropped:
            cmd, dropped = self._velocities(cmd, start, float(step_period), events)
        if dropped:
            return GuardResult(None, events)
        self._last_pass_s = now_s
        return GuardResult(cmd, events)

    def _positions(self, cmd: np.ndarray, events: list[Event]) -> tuple[np.ndarray, bool]:
        over = (cmd < self.lo) | (cmd > self.hi)
        if not over.any():
            return cmd, False
        excess = np.maximum(self.lo - cmd, cmd - self.hi)
        self._report(over, excess, "position", "", events)
        if self.mode == "reject":
            return cmd, True
        return np.clip(cmd, self.lo, self.hi), False

    def _velocities(self, cmd: np.ndarray, start: np.ndarray | None, step_period: float,
                    events: list[Event]) -> tuple[np.ndarray, bool]:
        max_step = self.vmax * step_period
        # row 0 is compared with the current state when known, else it has no predecessor
        prev = np.vstack([start[None] if start is not None else cmd[:1], cmd[:-1]])
        delta = cmd - prev
        over = np.abs(delta) > max_step
        if not over.any():
            return cmd, False
        self._report(over, np.abs(delta) / step_period - self.vmax, "velocity", "/s", events)
        if self.mode == "reject":
            return cmd, True
        out = cmd.copy()
        p = start if start is not None else cmd[0]
        for i in range(out.shape[0]):  # sequential: each row limited relative to the limited row before
            out[i] = p + np.clip(out[i] - p, -max_step, max_step)
            p = out[i]
        return out, False

    def _report(self, over: np.ndarray, excess: np.ndarray, what: str, unit: str,
                events: list[Event]) -> None:
        code = Code.ACTION_DROPPED if self.mode == "reject" else Code.ACTION_CLAMPED
        verb = "rejected" if self.mode == "reject" else "clamped"
        for j in np.flatnonzero(over.any(axis=0)):
            steps = int(over[:, j].sum())
            worst = float(excess[:, j][over[:, j]].max())
            events.append((code, f"{what} limit of '{self.joint_names[j]}' {verb} at {steps} "
                                 f"step(s), exceeded by up to {worst:.4g}{unit}"))


def _drop(code: Code, text: str) -> GuardResult:
    return GuardResult(None, [(code, text)])
