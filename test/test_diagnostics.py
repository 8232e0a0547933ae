"""capsule_ros.ros.diagnostics with real rclpy: both paths (the real Jazzy diagnostic_updater from
the tools archive, and the built-in publisher) publish the node-level and per-stream statuses on
/diagnostics; levels follow errors and context fill and come back to OK; start/stop follow a
lifecycle node through configure -> cleanup -> configure."""
from __future__ import annotations

import sys

import pytest

rclpy = pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from capsule_ros.ros.diagnostics import (PERIOD_PARAMETER, USE_FQN_PARAMETER,  # noqa: E402
                                         Diagnostics, stream_level)
from capsule_ros.runtime.figures import Figures, StreamFigures  # noqa: E402
from rosutil import Inbox, make_executor, spin_until  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.timeout(180)]
NODE = "capsule_node"
HWID = "capsule_ros-test"
OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR
NODE_STATUS, FRONT, WRIST = f"{NODE}: node", f"{NODE}: stream front", f"{NODE}: stream wrist"
WAIT_S = 30.0  # generous: a deadline for a condition, never a timing assertion


def block_updater(monkeypatch) -> None:
    """``import diagnostic_updater`` fails, whatever is installed: the built-in path."""
    monkeypatch.setitem(sys.modules, "diagnostic_updater", None)


def allow_updater(monkeypatch, path: str | None) -> None:
    monkeypatch.delitem(sys.modules, "diagnostic_updater", raising=False)
    if path:
        monkeypatch.syspath_prepend(path)


@pytest.fixture(params=["builtin", "diagnostic_updater"])
def backend(request, monkeypatch) -> str:
    if request.param == "builtin":
        block_updater(monkeypatch)
    else:
        allow_updater(monkeypatch, request.getfixturevalue("diagnostic_updater_path"))
    return request.param


def node_values() -> dict:
    return {"state": "active", "model": "qwen3_5", "device": "cpu",
            "gpu_memory_used_mb": 0, "gpu_memory_free_mb": 0}


def by_name(array: DiagnosticArray) -> dict[str, DiagnosticStatus]:
    return {s.name: s for s in array.status}


def values(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


class Graph:
    """The node under test and an observer node subscribed to /diagnostics, on one executor."""

    def __init__(self, ctx, node) -> None:
        self.node = node
        self.observer = rclpy.create_node("observer", context=ctx)
        self.inbox = Inbox(self.observer, DiagnosticArray, "/diagnostics", 10)
        self.ex = make_executor(ctx, node, self.observer)

    def wait_array(self, predicate, what: str) -> DiagnosticArray:
        spin_until(self.ex, lambda: self.inbox.last(predicate) is not None, WAIT_S, what)
        return self.inbox.last(predicate)

    def wait_full(self, names=(NODE_STATUS, FRONT)) -> DiagnosticArray:
        """A periodic update (holding every status), not the Updater's one-task start-up note."""
        return self.wait_array(lambda a: set(names) <= set(by_name(a)), f"statuses {names}")

    def wait_front(self, **expected: str) -> DiagnosticStatus:
        """The front stream's status from the latest array whose values read ``expected``
        (chosen to be unique to the state under test, so an older array cannot match)."""
        def has(a: DiagnosticArray) -> bool:
            s = by_name(a).get(FRONT)
            return s is not None and expected.items() <= values(s).items()
        return by_name(self.wait_array(has, f"front {expected}"))[FRONT]

    def wait_no_publisher(self) -> None:
        spin_until(self.ex, lambda: self.observer.count_publishers("/diagnostics") == 0,
                   WAIT_S, "the /diagnostics publisher to go")

    def close(self) -> None:
        self.ex.shutdown()
        self.observer.destroy_node()
        self.node.destroy_node()


@pytest.fixture
def graph(ros):
    g = Graph(ros, rclpy.create_node(NODE, context=ros))
    yield g
    g.close()


# -- levels, without ROS traffic ---------------------------------------------------------------
@pytest.mark.parametrize("errors, expected", [(0, 0), (2, 0), (3, 1), (9, 1), (10, 2), (25, 2)])
def test_level_thresholds_for_consecutive_errors(errors, expected):
    f = StreamFigures("front", max_context=512)
    for _ in range(errors):
        f.record_error()
    assert stream_level(f.snapshot(0))[0] == expected


@pytest.mark.parametrize("position, expected", [(0, 0), (460, 0), (461, 1), (511, 1), (512, 2)])
def test_level_thresholds_for_context(position, expected):
    # 90 % of 512 is 460.8: 460 is below it, 461 at or above; 512 is full
    f = StreamFigures("front", max_context=512)
    f.set_context(position)
    assert stream_level(f.snapshot(0))[0] == expected


def test_worst_condition_wins_and_both_are_said():
    f = StreamFigures("front", max_context=100)
    for _ in range(3):
        f.record_error()
    f.set_context(100)
    level, message = stream_level(f.snapshot(0))
    assert level == 2
    assert message == "context full (100/100); 3 failed queries in a row"


# -- over the wire, both paths -----------------------------------------------------------------
def test_publishes_node_and_stream_statuses(graph, backend):
    figures = Figures(window=16, max_context=512)
    clock_ns = graph.node.get_clock().now().nanoseconds
    front = figures.stream("front")
    front.record_message(receive_ns=clock_ns, stamp_ns=clock_ns - 5_000_000)  # 5 ms late
    front.record_answer(1.0, 2.0, 3.0, 4.0, position=90)
    front.record_answer(3.0, 2.0, 3.0, 4.0, position=100)
    figures.stream("wrist")
    diag = Diagnostics(graph.node, figures, HWID, period=0.1, node_values=node_values)
    diag.start()
    assert diag.backend == backend

    got = by_name(graph.wait_full((NODE_STATUS, FRONT, WRIST)))
    assert {s.hardware_id for s in got.values()} == {HWID}
    node = got[NODE_STATUS]
    assert node.level == OK and node.message == "active qwen3_5 cpu"
    assert values(node) == {"state": "active", "model": "qwen3_5", "device": "cpu",
                            "gpu_memory_used_mb": "0", "gpu_memory_free_mb": "0"}
    fv = values(got[FRONT])
    assert got[FRONT].level == OK
    assert (fv["queries"], fv["errors"], fv["position"], fv["max_context"]) == ("2", "0", "100", "512")
    assert fv["context_used_pct"] == "19.5"              # 100 / 512 = 19.53 %
    assert fv["stamp_delay_ms_p50"] == "5.000"
    assert (fv["restore_ms_p50"], fv["restore_ms_p99"]) == ("1.000", "3.000")  # ranks 1 and 2 of [1, 3]
    assert (fv["total_ms_p50"], fv["total_ms_p99"]) == ("10.000", "12.000")    # 1+2+3+4, 3+2+3+4
    assert fv["latency_window"] == "2"
    wv = values(got[WRIST])
    assert got[WRIST].level == OK and wv["queries"] == "0" and wv["restore_ms_p99"] == "n/a"

    diag.stop()
    assert diag.backend is None
    assert not graph.node.has_parameter(PERIOD_PARAMETER)
    assert not graph.node.has_parameter(USE_FQN_PARAMETER)
    graph.wait_no_publisher()


def test_levels_go_warn_error_and_back_to_ok(graph, backend):
    figures = Figures(max_context=512)
    front = figures.stream("front")
    diag = Diagnostics(graph.node, figures, HWID, period=0.1, node_values=node_values)
    diag.start()
    graph.wait_full()

    for _ in range(2):
        front.record_error()
    assert graph.wait_front(consecutive_errors="2").level == OK
    front.record_error()
    status = graph.wait_front(consecutive_errors="3")
    assert status.level == WARN and status.message == "3 failed queries in a row"
    for _ in range(7):
        front.record_error()
    status = graph.wait_front(consecutive_errors="10")
    assert status.level == ERROR and status.message == "10 failed queries in a row"
    front.record_answer(1.0, 1.0, 1.0, 1.0, position=10)
    status = graph.wait_front(consecutive_errors="0", queries="1")
    assert status.level == OK and values(status)["errors"] == "10"

    front.set_context(460)
    assert graph.wait_front(position="460").level == OK
    front.set_context(461)
    status = graph.wait_front(position="461")
    assert status.level == WARN and status.message == "context 90% full (461/512)"
    front.set_context(512)
    status = graph.wait_front(position="512")
    assert status.level == ERROR and status.message == "context full (512/512)"
    front.set_context(0)  # a reset
    assert graph.wait_front(position="0", queries="1").level == OK
    diag.stop()


def test_a_failing_node_callable_is_an_error_status_not_a_crash(graph, backend):
    def broken() -> dict:
        raise RuntimeError("no model")

    diag = Diagnostics(graph.node, Figures(), HWID, period=0.1, node_values=broken)
    diag.start()
    got = by_name(graph.wait_array(
        lambda a: NODE_STATUS in by_name(a) and by_name(a)[NODE_STATUS].level == ERROR,
        "an ERROR node status"))
    assert "no model" in got[NODE_STATUS].message
    diag.stop()


def test_streams_added_and_dropped_while_running(graph, backend):
    figures = Figures()
    figures.stream("front")
    diag = Diagnostics(graph.node, figures, HWID, period=0.1)
    diag.start()
    graph.wait_full()
    figures.stream("fork_1").record_error()  # a forked stream appears
    graph.wait_full((NODE_STATUS, FRONT, f"{NODE}: stream fork_1"))
    figures.drop("fork_1")
    graph.inbox.messages.clear()
    got = by_name(graph.wait_full())
    assert f"{NODE}: stream fork_1" not in got
    diag.stop()


def test_force_update_publishes_now(graph, backend):
    figures = Figures()
    figures.stream("front").record_error()
    diag = Diagnostics(graph.node, figures, HWID, period=3600.0, node_values=node_values)
    diag.start()  # an hour's period: only force_update can publish a full array here
    diag.force_update()
    got = by_name(graph.wait_full())
    assert values(got[FRONT])["errors"] == "1"
    diag.stop()


def test_both_paths_publish_the_same_content(graph, monkeypatch, diagnostic_updater_path):
    figures = Figures(window=8, max_context=256)
    front = figures.stream("front")
    front.record_answer(0.5, 4.0, 2.0, 0.1, position=240)  # 93.75 %: WARN
    front.record_error()
    # no messages: rate and "since last message" stay fixed, so the arrays can be compared whole

    def publish_once(backend: str) -> list[tuple]:
        diag = Diagnostics(graph.node, figures, HWID, period=0.1, node_values=node_values)
        diag.start()
        assert diag.backend == backend
        graph.inbox.messages.clear()
        array = graph.wait_full()
        diag.stop()
        graph.wait_no_publisher()
        return sorted((s.name, s.level, s.message, s.hardware_id, values(s)) for s in array.status)

    with monkeypatch.context() as m:
        block_updater(m)
        builtin = publish_once("builtin")
    with monkeypatch.context() as m:
        allow_updater(m, diagnostic_updater_path)
        updater = publish_once("diagnostic_updater")
    assert builtin == updater
    assert [(name, level) for name, level, *_ in builtin] == [(NODE_STATUS, OK), (FRONT, WARN)]


# -- the lifecycle ---------------------------------------------------------------------------------
class ManagedNode(LifecycleNode):
    """What the capsule node does with Diagnostics: created and started at configure (so an
    inactive node is visible too), stopped at cleanup and shutdown."""

    def __init__(self, ctx, **kwargs) -> None:
        super().__init__(NODE, context=ctx, **kwargs)
        self.figures = Figures(max_context=128)
        self.diagnostics: Diagnostics | None = None
        self.state_label = "unconfigured"

    def _values(self) -> dict:
        return {"state": self.state_label}

    def on_configure(self, state) -> TransitionCallbackReturn:
        self.figures.stream("front")
        self.diagnostics = Diagnostics(self, self.figures, HWID, period=1.0,
                                       node_values=self._values)
        self.diagnostics.start()
        self.state_label = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        self.state_label = "active"
        return super().on_activate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self.diagnostics.stop()
        self.diagnostics = None
        self.state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        if self.diagnostics is not None:
            self.diagnostics.stop()
        return TransitionCallbackReturn.SUCCESS


def test_follows_the_lifecycle_configure_cleanup_configure(ros, backend):
    # the period comes from the parameter diagnostic_updater declares (an override wins)
    node = ManagedNode(ros, parameter_overrides=[Parameter(PERIOD_PARAMETER, value=0.1)])
    g = Graph(ros, node)
    try:
        assert g.observer.count_publishers("/diagnostics") == 0
        for cycle in range(2):
            assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
            assert node.diagnostics.backend == backend
            assert node.diagnostics.period == 0.1
            assert node.get_parameter(PERIOD_PARAMETER).value == 0.1
            status = by_name(g.wait_full())[NODE_STATUS]
            assert status.message == "inactive", f"cycle {cycle}"
            assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
            g.wait_array(lambda a: by_name(a).get(NODE_STATUS, status).message == "active",
                         "the active state in the node status")
            assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
            assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
            assert not node.has_parameter(PERIOD_PARAMETER)
            g.wait_no_publisher()
            g.inbox.messages.clear()
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_shutdown() == TransitionCallbackReturn.SUCCESS
        g.wait_no_publisher()
    finally:
        g.close()
