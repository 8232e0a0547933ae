"""``/diagnostics`` for the node: one status per stream plus one node-level status.

Published through ``diagnostic_updater.Updater`` when ``import diagnostic_updater`` works (apt
``ros-jazzy-diagnostic-updater`` on a robot), else through a small built-in publisher of
``diagnostic_msgs/DiagnosticArray`` with the same content, names, topic, QoS and parameters:

  /diagnostics                  DiagnosticArray, reliable, depth 1 (as the Updater publishes)
  diagnostic_updater.period     seconds between updates (default: the ``period`` given here)
  diagnostic_updater.use_fqn    status names prefixed by the node's full name (default false)
  status names                  "<node>: node", "<node>: stream <name>"

Levels of a stream's status (thresholds below; the worst condition wins):
  OK     otherwise
  WARN   >= WARN_CONSECUTIVE_ERRORS failed queries in a row, or the context position is
         >= WARN_CONTEXT_FRACTION of the model's max context
  ERROR  >= ERROR_CONSECUTIVE_ERRORS failed queries in a row, or the context is full
         (position >= max context)
A successful answer ends a run of errors; a reset/rollback (``Figures.stream(s).set_context``)
brings the context level back. The node-level status is OK, or ERROR when the node's value
callable itself fails.

Lifecycle: construct with the node (nothing is created yet), ``start()`` creates the publisher,
timer and parameters (the Updater, when available), ``stop()`` destroys them again, so a
cleanup -> configure cycle starts cleanly. The figures come from ``capsule_ros.runtime.figures``.
"""
from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Mapping

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node

from ..runtime.figures import LATENCY_PARTS, Figures, Spread, StreamSnapshot

WARN_CONSECUTIVE_ERRORS = 3    # a stream failing this many queries in a row: WARN
ERROR_CONSECUTIVE_ERRORS = 10  # ... this many: ERROR (it is not answering at all)
WARN_CONTEXT_FRACTION = 0.9    # context position at or above 90 % of max context: WARN
# ERROR when the context is full: position >= max context (the context policy must act now).

OK, WARN, ERROR = 0, 1, 2
PERIOD_PARAMETER = "diagnostic_updater.period"   # the names diagnostic_updater declares
USE_FQN_PARAMETER = "diagnostic_updater.use_fqn"
NODE_TASK = "node"
DIAGNOSTICS_TOPIC = "/diagnostics"

NodeValues = Callable[[], Mapping[str, Any]]


def stream_level(s: StreamSnapshot) -> tuple[int, str]:
    """The level of a stream and a one-line message saying why (worst condition first)."""
    problems: list[tuple[int, str]] = []
    if s.consecutive_errors >= ERROR_CONSECUTIVE_ERRORS:
        problems.append((ERROR, f"{s.consecutive_errors} failed queries in a row"))
    elif s.consecutive_errors >= WARN_CONSECUTIVE_ERRORS:
        problems.append((WARN, f"{s.consecutive_errors} failed queries in a row"))
    if s.max_context > 0 and s.position >= s.max_context:
        problems.append((ERROR, f"context full ({s.position}/{s.max_context})"))
    elif s.max_context > 0 and s.context_fraction >= WARN_CONTEXT_FRACTION:
        problems.append((WARN, f"context {s.context_fraction:.0%} full "
                               f"({s.position}/{s.max_context})"))
    if not problems:
        return OK, f"{s.queries} queries, {s.rate_hz:.1f} Hz"
    problems.sort(key=lambda p: -p[0])
    return problems[0][0], "; ".join(text for _, text in problems)


def _num(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def stream_values(s: StreamSnapshot) -> list[tuple[str, str]]:
    """The key/value pairs of a stream's status; the same keys whatever has been recorded."""
    values = [
        ("queries", str(s.queries)), ("errors", str(s.errors)),
        ("consecutive_errors", str(s.consecutive_errors)),
        ("position", str(s.position)), ("max_context", str(s.max_context)),
        ("context_used_pct", _num(100.0 * s.context_fraction, 1)),
        ("messages", str(s.messages)), ("rate_hz", _num(s.rate_hz, 2)),
        ("since_last_message_s", _num(s.since_last_message_s, 2)),
    ]
    values += _spread("stamp_delay_ms", s.stamp_delay_ms)
    for part in LATENCY_PARTS:
        values += _spread(part, s.latency_ms[part])
    values.append(("latency_window", str(s.latency_ms[LATENCY_PARTS[-1]].samples)))
    return values


def _spread(name: str, spread: Spread) -> list[tuple[str, str]]:
    return [(f"{name}_p50", _num(spread.p50)), (f"{name}_p99", _num(spread.p99))]


def node_summary(values: NodeValues) -> tuple[int, str, list[tuple[str, str]]]:
    """Level, message and key/values of the node-level status from the node's callable."""
    try:
        got = dict(values())
    except Exception as e:  # noqa: BLE001 - diagnostics must report a failure, not raise in a timer
        return ERROR, f"node values unavailable: {e!r}", []
    parts = [str(got[k]) for k in ("state", "model", "device") if k in got]
    return OK, " ".join(parts) or "running", [(str(k), str(v)) for k, v in got.items()]


def _fill(status: DiagnosticStatus, level: int, message: str,
          values: list[tuple[str, str]]) -> DiagnosticStatus:
    status.level = bytes([level])
    status.message = message
    status.values = [KeyValue(key=k, value=v) for k, v in values]
    return status


class Diagnostics:
    """Per-stream and node-level diagnostics of a (lifecycle) node. See the module docstring."""

    def __init__(self, node: Node, figures: Figures, hardware_id: str, period: float = 1.0,
                 node_values: NodeValues = dict,
                 stream_extra: Callable[[str], Mapping[str, Any]] = lambda stream: {}) -> None:
        """``stream_extra(stream)``: more values for a stream's status (e.g. the worker's
        accounting), appended after the figures."""
        self.node, self.figures, self.stream_extra = node, figures, stream_extra
        self.hardware_id, self.period, self.node_values = hardware_id, float(period), node_values
        self.backend: str | None = None     # "diagnostic_updater" | "builtin" while started
        self._updater: Any = None
        self._module: Any = None            # diagnostic_updater, on that path
        self._publisher: Any = None
        self._timer: Any = None
        self._declared: list[str] = []      # parameters start() added, undeclared by stop()
        self._stream_tasks: set[str] = set()
        self._prefix = ""                   # status name prefix (built-in path)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Create the publisher and timer (idempotent). Call at configure or activate."""
        if self.backend is not None:
            return
        before = {p for p in (PERIOD_PARAMETER, USE_FQN_PARAMETER) if self.node.has_parameter(p)}
        module = _import_updater()
        if module is not None:
            self._module = module
            self._start_updater(module)
            self.backend = "diagnostic_updater"
        else:
            self._start_builtin()
            self.backend = "builtin"
        self._declared = [p for p in (PERIOD_PARAMETER, USE_FQN_PARAMETER)
                          if p not in before and self.node.has_parameter(p)]

    def stop(self) -> None:
        """Destroy what ``start`` created (idempotent). Call at cleanup and shutdown."""
        if self.backend is None:
            return
        timer = self._updater.timer if self._updater is not None else self._timer
        publisher = self._updater.publisher if self._updater is not None else self._publisher
        self.node.destroy_timer(timer)
        self.node.destroy_publisher(publisher)
        for name in self._declared:  # so the next start() can declare them again
            self.node.undeclare_parameter(name)
        self._updater = self._module = self._publisher = self._timer = None
        self._declared, self._stream_tasks = [], set()
        self.backend = None

    def force_update(self) -> None:
        """Publish now (e.g. right after a lifecycle transition)."""
        if self._updater is not None:
            self._updater.force_update()
        elif self.backend is not None:
            self._publish_builtin()

    # -- content, shared by both paths ----------------------------------------------------
    def _snapshot(self, stream: str) -> StreamSnapshot | None:
        if stream not in self.figures.names():
            return None
        return self.figures.stream(stream).snapshot(self.node.get_clock().now().nanoseconds)

    def _fill_stream(self, stream: str, status: DiagnosticStatus) -> DiagnosticStatus:
        snap = self._snapshot(stream)
        if snap is None:  # dropped between the task list and this update
            return _fill(status, OK, "dropped", [])
        level, message = stream_level(snap)
        extra = [(k, str(v)) for k, v in self.stream_extra(stream).items()]
        return _fill(status, level, message, stream_values(snap) + extra)

    def _fill_node(self, status: DiagnosticStatus) -> DiagnosticStatus:
        return _fill(status, *node_summary(self.node_values))

    # -- through diagnostic_updater -------------------------------------------------------
    def _start_updater(self, module: Any) -> None:
        if self.node.has_parameter(PERIOD_PARAMETER):
            # Updater declares it unconditionally: hand it the value to declare again
            self.period = float(self.node.get_parameter(PERIOD_PARAMETER).value)
            self.node.undeclare_parameter(PERIOD_PARAMETER)
        updater = _syncing_updater(module)(self.node, self.period, self._sync_tasks)
        updater.setHardwareID(self.hardware_id)
        self.period = float(self.node.get_parameter(PERIOD_PARAMETER).value)  # an override wins
        updater.add(module.FunctionDiagnosticTask(NODE_TASK, self._fill_node))
        self._updater = updater
        self._sync_tasks()

    def _sync_tasks(self) -> None:
        """One Updater task per stream in the figures: streams come (fork, load) and go."""
        names = set(self.figures.names())
        for stream in sorted(names - self._stream_tasks):
            task = self._module.FunctionDiagnosticTask(
                _stream_task(stream), lambda stat, s=stream: self._fill_stream(s, stat))
            self._updater.add(task)
        for stream in sorted(self._stream_tasks - names):
            self._updater.removeByName(_stream_task(stream))
        self._stream_tasks = names

    # -- built in: the same array, our own publisher and timer ----------------------------
    def _start_builtin(self) -> None:
        self.period = float(_declared(self.node, PERIOD_PARAMETER, self.period))
        use_fqn = bool(_declared(self.node, USE_FQN_PARAMETER, False))
        node = self.node
        self._prefix = (f"{node.get_namespace()}/{node.get_name()}" if use_fqn
                        else node.get_name())  # diagnostic_updater's naming, to the character
        self._publisher = node.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, 1)
        self._timer = node.create_timer(self.period, self._publish_builtin)

    def _publish_builtin(self) -> None:
        array = DiagnosticArray()
        array.header.stamp = self.node.get_clock().now().to_msg()
        statuses = [(NODE_TASK, self._fill_node)]
        statuses += [(_stream_task(s), lambda st, s=s: self._fill_stream(s, st))
                     for s in self.figures.names()]
        for task, fill in statuses:
            status = fill(DiagnosticStatus())
            status.name = f"{self._prefix}: {task}"
            status.hardware_id = self.hardware_id
            array.status.append(status)
        self._publisher.publish(array)


def _stream_task(stream: str) -> str:
    return f"stream {stream}"


def _declared(node: Node, name: str, default: Any) -> Any:
    """The parameter's value, declaring it with ``default`` (an override wins) if needed."""
    if not node.has_parameter(name):
        node.declare_parameter(name, default)
    return node.get_parameter(name).value


def _import_updater() -> Any:
    """``diagnostic_updater`` when importable, else None; asked at each start, so a package
    installed later (or taken away) is honoured without restarting the interpreter."""
    try:
        return importlib.import_module("diagnostic_updater")
    except ImportError:
        return None


def _syncing_updater(module: Any) -> type:
    """The Updater whose every update first brings the task list in line with the streams.
    (Updater.update runs its tasks under a non-reentrant lock, so the sync cannot be a task.)"""

    class SyncingUpdater(module.Updater):
        def __init__(self, node: Node, period: float, sync: Callable[[], None]) -> None:
            self._sync = sync
            super().__init__(node, period)

        def update(self) -> None:
            self._sync()
            super().update()

    return SyncingUpdater
