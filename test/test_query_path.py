"""The query path through the managed node on Jazzy's rclpy: one worker that never blocks the
executor, faults that cost one status and nothing else, verbs that keep the stream's order,
forked streams queried with an observation, and accounting that adds up.

Slow queries are made deterministic by a head that blocks on an event the test releases."""
from __future__ import annotations

import json
import threading

import pytest

rclpy = pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rcl_interfaces.srv import GetParameters  # noqa: E402

from capsule_ros.msg import Query, Status  # noqa: E402
from capsule_ros.ros.node import ANSWER_QOS  # noqa: E402
from capsule_ros.runtime.worker import OUTCOMES  # noqa: E402
from capsule_ros.srv import CapsuleOp  # noqa: E402
from rosutil import activate, spin_until, wait_matched  # noqa: E402
from test_lifecycle import Rig as LifecycleRig  # noqa: E402
from test_node import image, joints  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.timeout(240)]


class Rig(LifecycleRig):
    """test_lifecycle's rig, active, plus ~/query, ~/capsule, parameters and /diagnostics."""

    def __init__(self, ctx, params_file):
        super().__init__(ctx, params_file)
        activate(self.node)
        self.diagnostics: list[DiagnosticArray] = []
        ns = self.node.get_fully_qualified_name()
        c = self.client
        c.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.query = c.create_publisher(Query, f"{ns}/query", ANSWER_QOS)
        self.capsule = c.create_client(CapsuleOp, f"{ns}/capsule")
        self.params = c.create_client(GetParameters, f"{ns}/get_parameters")
        wait_matched(self.ex, c, publishers=[self.cam, self.joints, self.query])
        spin_until(self.ex, self.capsule.service_is_ready, 20, "~/capsule")

    def frame(self, k: int) -> None:
        self.joints.publish(joints(k))
        self.cam.publish(image(64, 48, k))

    def call(self, op: str, stream: str = "", target: str = "") -> CapsuleOp.Response:
        future = self.capsule.call_async(CapsuleOp.Request(op=op, stream=stream, target=target))
        spin_until(self.ex, future.done, 60, f"~/capsule {op}")
        return future.result()

    def accounting(self) -> dict:
        return json.loads(self.call("stats").json)["accounting"]

    def diagnosed(self, name_suffix: str) -> dict:
        """The newest /diagnostics values of the status whose name ends with ``name_suffix``."""
        for array in reversed(self.diagnostics):
            for status in array.status:
                if status.name.endswith(name_suffix):
                    return {kv.key: kv.value for kv in status.values}
        return {}


@pytest.fixture
def rig(ros, default_params, one_torch_thread):
    r = Rig(ros, default_params)
    yield r
    r.close()


def balanced(acc: dict) -> bool:
    return all(row["received"] == sum(row[k] for k in OUTCOMES) + row["pending"]
               for row in acc.values())


class BlockingHead:
    """Wraps a head: its first call waits for ``release`` (the test's event)."""

    def __init__(self, head):
        self.head, self.entered, self.release, self.calls = head, threading.Event(), threading.Event(), 0

    def __call__(self, hidden):
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(60)
        return self.head(hidden)

    def __getattr__(self, name):
        return getattr(self.head, name)


def test_a_slow_query_blocks_neither_the_executor_nor_other_services(rig, monkeypatch):
    blocking = BlockingHead(rig.node.pipeline.heads["front"])
    monkeypatch.setitem(rig.node.pipeline.heads, "front", blocking)
    rig.frame(0)
    spin_until(rig.ex, blocking.entered.is_set, 30, "the first query to start")
    # while it runs: parameters answer, diagnostics go out, and newer frames supersede each other
    future = rig.params.call_async(GetParameters.Request(names=["model.dtype"]))
    spin_until(rig.ex, future.done, 30, "get_parameters while a query runs")
    assert future.result().values[0].string_value == "float32"
    seen = len(rig.diagnostics)
    spin_until(rig.ex, lambda: len(rig.diagnostics) > seen, 30, "/diagnostics while a query runs")
    for k in (1, 2, 3):
        rig.frame(k)
    spin_until(rig.ex, lambda: rig.node.pipeline.scheduler.accounting()["front"]["received"] == 4,
               30, "the three frames to be received")
    blocking.release.set()
    spin_until(rig.ex, lambda: len(rig.actions) == 2, 30, "two answers")
    first, last = rig.actions
    assert (first.seq, first.dropped, last.seq, last.dropped) == (1, 0, 2, 2)
    assert last.header.stamp.sec == 103          # the freshest frame was the one answered
    acc = rig.accounting()
    assert acc["front"]["superseded"] == 2 and acc["front"]["answered"] == 2 and balanced(acc)
    spin_until(rig.ex, lambda: rig.diagnosed("stream front").get("answered") == "2", 30,
               "the accounting in /diagnostics")
    front = rig.diagnosed("stream front")
    assert front["superseded"] == "2" and front["received"] == "4"


@pytest.mark.parametrize("where", ["encode", "append", "act", "commit", "publish"])
def test_a_fault_anywhere_costs_one_status_and_the_next_frame_is_answered(rig, monkeypatch, where):
    pipeline = rig.node.pipeline
    rig.frame(0)
    spin_until(rig.ex, lambda: len(rig.actions) == 1, 30, "a first answer")
    position = pipeline.positions()["front"]
    fault = {"armed": True}

    def once(real):
        def wrapped(*a, **kw):
            if fault["armed"]:
                fault["armed"] = False
                raise RuntimeError(f"injected fault in {where}")
            return real(*a, **kw)
        return wrapped
    target = {"encode": (pipeline.encoders["front_cam"], "encode"),
              "append": (pipeline.engine, "_append"), "act": (pipeline.heads["front"], "forward"),
              "commit": (pipeline.engine, "commit"), "publish": (rig.node.actions_pub, "publish")}
    obj, name = target[where]
    monkeypatch.setattr(obj, name, once(getattr(obj, name)))
    rig.frame(1)
    if where == "publish":  # committed, then the publisher broke: the answer is lost, not the node
        spin_until(rig.ex, lambda: pipeline.positions()["front"] > position, 30, "the commit")
    else:
        spin_until(rig.ex, lambda: any(s.code == Status.INTERNAL for s in rig.statuses), 30,
                   "an INTERNAL status")
        internal = [s for s in rig.statuses if s.code == Status.INTERNAL]
        assert len(internal) == 1 and f"injected fault in {where}" in internal[0].text
        assert pipeline.positions()["front"] == position   # the previous boundary stands
    rig.frame(2)
    spin_until(rig.ex, lambda: any(a.header.stamp.sec == 102 for a in rig.actions), 30,
               "the next frame's answer")
    acc = rig.accounting()
    assert balanced(acc) and acc["front"]["pending"] == 0


def test_fork_query_with_an_observation_then_drop_and_the_node_serves_on(rig):
    rig.frame(0)
    spin_until(rig.ex, lambda: len(rig.actions) == 1, 30, "a first answer")
    assert rig.call("fork", "front", "front_copy").ok
    # a forked stream has no trigger: a query names the input whose newest message it appends
    rig.query.publish(Query(stream="front_copy", request_id=41, input="front_cam"))
    spin_until(rig.ex, lambda: any(a.stream == "front_copy" for a in rig.actions), 30,
               "the forked stream's answer")
    answer = next(a for a in rig.actions if a.stream == "front_copy")
    assert answer.request_id == 41 and answer.boundary > rig.actions[0].boundary
    assert rig.call("drop", "front_copy").ok
    seen = len(rig.diagnostics)
    spin_until(rig.ex, lambda: len(rig.diagnostics) > seen + 1, 30, "diagnostics after the drop")
    rig.frame(1)
    spin_until(rig.ex, lambda: sum(a.stream == "front" for a in rig.actions) == 2, 30,
               "an answer after the drop")
    # the same mistake gets the same code on both interfaces
    missing = rig.call("rollback", "front_copy")
    assert not missing.ok and missing.code == Status.UNKNOWN_STREAM
    rig.query.publish(Query(stream="front_copy"))
    spin_until(rig.ex, lambda: any(s.stream == "front_copy" for s in rig.statuses), 30, "status")
    assert [s.code for s in rig.statuses if s.stream == "front_copy"] == [Status.UNKNOWN_STREAM]


def test_a_bad_context_message_is_one_status_without_a_request_id(rig):
    bad = joints(0)
    bad.name = ["joint_1"]          # six configured joints missing; it feeds both streams
    bad.position = [0.0]
    bad.velocity = [0.0]
    rig.joints.publish(bad)
    spin_until(rig.ex, lambda: rig.statuses, 30, "a status")
    rig.frame(1)
    spin_until(rig.ex, lambda: rig.actions, 30, "an answer")
    assert [(s.stream, s.input, s.request_id, s.code) for s in rig.statuses] == [
        ("", "joints", 0, Status.MISSING_JOINT)]
    assert rig.actions[0].request_id == 1   # the rejected message consumed no id


def test_verify_mode_turned_on_live_runs_between_queries_and_reports_in_diagnostics(rig):
    from rclpy.parameter import Parameter
    [result] = rig.node.set_parameters([Parameter("capsules.verify_every", value=1)])
    assert result.successful
    for k in range(3):
        rig.frame(k)
        spin_until(rig.ex, lambda: len(rig.actions) == k + 1, 30, f"answer {k}")
    # each boundary is recomputed between queries, on the worker, and the count published
    spin_until(rig.ex, lambda: int(rig.diagnosed(": node").get("verifies", "0")) >= 2, 60,
               "verifications reported in /diagnostics")
    assert rig.diagnosed(": node")["verify_mismatches"] == "0"
    assert not [s for s in rig.statuses if s.code == Status.VERIFY_MISMATCH]



def test_an_exception_in_a_subscription_callback_is_a_status_not_a_crash(rig, monkeypatch):
    pipeline = rig.node.pipeline
    real = pipeline.on_message
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("a bug in handing on")
        return real(*args, **kwargs)
    monkeypatch.setattr(pipeline, "on_message", flaky)
    rig.frame(0)   # the joint state hits the bug; the frame goes through
    spin_until(rig.ex, lambda: any(s.code == Status.INTERNAL for s in rig.statuses), 30, "status")
    rig.frame(1)
    spin_until(rig.ex, lambda: any(a.header.stamp.sec == 101 for a in rig.actions), 30, "answer")
    assert [s.code for s in rig.statuses] == [Status.INTERNAL]
    assert "KeyError" in rig.statuses[0].text
