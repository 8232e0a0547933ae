"""capsule_node in-process: triggers, stream isolation through one live buffer set, bad input."""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from builtin_interfaces.msg import Time  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402

from capsule_ros.msg import ActionChunk, Query, Status  # noqa: E402
from capsule_ros.ros.launch_args import node_arguments  # noqa: E402
from capsule_ros.ros.node import CapsuleNode  # noqa: E402
from rosutil import activate, make_executor, ros_context, spin_until, wait_matched  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.timeout(180)]
FRONT, WRIST, JOINTS = "/front_cam/image_raw", "/wrist_cam/image_raw", "/joint_states"
JOINT_NAMES = [f"joint_{i}" for i in range(1, 8)]


def image(width: int, height: int, k: int, encoding: str = "rgb8", stamp_s: int = 100) -> Image:
    rng = np.random.default_rng(k)
    bpp = 1 if encoding == "mono8" else 3
    msg = Image(height=height, width=width, encoding=encoding, step=width * bpp,
                data=rng.integers(0, 256, height * width * bpp, dtype=np.uint8).tobytes())
    msg.header.stamp = Time(sec=stamp_s + k, nanosec=0)
    return msg


def joints(k: int) -> JointState:
    msg = JointState(name=JOINT_NAMES, position=[0.1 * k + j for j in range(7)],
                     velocity=[0.01 * j for j in range(7)])
    msg.header.stamp = Time(sec=100 + k, nanosec=0)
    return msg


class Harness:
    """A capsule node and a client node on one executor, started with the launch arguments."""

    def __init__(self, ctx, params_file, **launch):
        args = node_arguments(params_file=str(params_file), **launch)
        self.node = activate(CapsuleNode(context=ctx, cli_args=args.cli_args()))
        self.client = rclpy.create_node("test_client", context=ctx)
        self.ex = make_executor(ctx, self.node, self.client)
        ns = self.node.get_fully_qualified_name()
        self.actions: list[ActionChunk] = []
        self.statuses: list[Status] = []
        self.client.create_subscription(ActionChunk, f"{ns}/actions", self.actions.append, 100)
        self.client.create_subscription(Status, f"{ns}/status", self.statuses.append, 100)
        self.pubs = {t: self.client.create_publisher(m, t, 10)
                     for t, m in ((FRONT, Image), (WRIST, Image), (JOINTS, JointState))}
        self.query_pub = self.client.create_publisher(Query, f"{ns}/query", 10)
        self.clock_pub = self.client.create_publisher(Clock, "/clock", 10)
        wait_matched(self.ex, self.client, publishers=[*self.pubs.values(), self.query_pub],
                     subscribed_topics=[f"{ns}/actions", f"{ns}/status"])

    def answers(self) -> int:
        return len(self.actions) + len(self.statuses)

    def send(self, topic: str, msg, expect_answer: bool = True) -> None:
        """Publish; for a trigger, wait for its answer. Context needs no wait: the node pairs a
        trigger with the newest context message stamped at or before it, whenever it arrives."""
        before = self.answers()
        self.pubs[topic].publish(msg)
        if expect_answer:
            spin_until(self.ex, lambda: self.answers() > before, 30, f"answer to {topic}")

    def trigger(self, stream: str, k: int) -> None:
        """The k-th observation of a stream: its joint state, then its camera image, both
        stamped with the next second of this harness's clock (stamps only ever grow, as a
        robot's do; the content depends on ``stream`` and ``k`` alone)."""
        self.clock_s = getattr(self, "clock_s", 99) + 1
        stamp = Time(sec=self.clock_s, nanosec=0)
        if stream == "front":
            joint, frame, topic = joints(k), image(64, 48, k), FRONT
        else:
            joint, frame, topic = joints(500 + k), image(48, 48, 1000 + k), WRIST
        joint.header.stamp = frame.header.stamp = stamp
        self.send(JOINTS, joint, expect_answer=False)
        self.send(topic, frame)

    def close(self) -> None:
        self.node.pipeline.close()  # what the node's shutdown does: flush capsule writes
        self.node.destroy_node()
        self.client.destroy_node()


@contextmanager
def running_node(params, **launch) -> Iterator[Harness]:
    """A capsule node and a test client in a fresh ROS context, torn down afterwards."""
    with ros_context() as ctx:
        h = Harness(ctx, params, **launch)
        try:
            yield h
        finally:
            h.close()


def capsule_hashes(engine) -> dict:
    """sha256 of every tensor and the metadata of every capsule in the store."""
    out = {}
    for name in engine.store.list():
        slot = engine.store.slot(name)
        for tag, cap in [("current", slot.current), ("base", slot.base),
                         *((f"h{i}", c) for i, c in enumerate(slot.history))]:
            if cap is None:
                continue
            h = hashlib.sha256(repr(sorted(cap.meta.items())).encode())
            for seg in cap.kv:
                for key in sorted(seg.rows):
                    h.update(seg.rows[key].numpy().tobytes())
            for key in sorted(cap.state):
                h.update(cap.state[key].numpy().tobytes())
            out[(name, tag)] = (cap.position, h.hexdigest())
    return out


def test_trigger_gives_action_on_its_stream(default_params):
    with running_node(default_params) as h:
        h.trigger("front", 1)
        h.trigger("wrist", 2)
        assert [s.text for s in h.statuses] == []
        front, wrist = h.actions
        assert (front.stream, front.request_id, wrist.stream, wrist.request_id) == ("front", 1, "wrist", 1)
        assert front.header.stamp.sec == 100 and not front.stamp_is_receive_time
        assert (front.horizon, front.dof, len(front.values)) == (8, 7, 56)
        assert front.boundary == 16 + 1  # 4x4 image patches + one joint-state token
        assert np.all(np.isfinite(front.values)) and front.append_ms > 0


def _run(params, plan: list[str]) -> tuple[dict[str, list[np.ndarray]], dict]:
    with running_node(params) as h:
        engine = h.node.pipeline.engine
        regions = {k: r.data_ptr() for k, r in engine.live.regions.items()}
        restores0 = engine.counters["restores"]
        seen = {"front": 0, "wrist": 0}
        for stream in plan:  # each stream's k-th trigger sees the same messages in every run
            h.trigger(stream, seen[stream])
            seen[stream] += 1
        out: dict[str, list[np.ndarray]] = {"front": [], "wrist": []}
        for a in h.actions:
            out[a.stream].append(np.array(a.values, dtype=np.float32))
        # one live buffer set: same regions, and every layer's cache is a view into them
        assert {k: r.data_ptr() for k, r in engine.live.regions.items()} == regions
        for layer in engine.model.cache.layers:
            if getattr(layer, "keys", None) is not None:
                kv = engine.live.regions["kv.float32"]
                start = kv.data_ptr()
                assert start <= layer.keys.data_ptr() < start + kv.numel() * kv.element_size()
        info = {"restores": engine.counters["restores"] - restores0}
        return out, info


def test_interleaved_streams_equal_each_stream_alone_through_one_live_set(default_params):
    # The same messages per stream in every run; only the interleaving differs.
    mixed = ["front", "wrist", "front", "wrist", "front", "wrist"]
    inter, info = _run(default_params, mixed)
    alone_front, _ = _run(default_params, ["front"] * 3)
    alone_wrist, _ = _run(default_params, ["wrist"] * 3)
    # every query after the first switched streams: a real restore each time
    assert info["restores"] >= len(mixed) - 1
    for stream, alone in (("front", alone_front), ("wrist", alone_wrist)):
        assert len(inter[stream]) == len(alone[stream]) == 3
        for a, b in zip(inter[stream], alone[stream]):
            np.testing.assert_array_equal(a, b)


def test_bad_input_gives_coded_status_and_changes_no_capsule(default_params):
    with running_node(default_params) as h:
        h.trigger("front", 0)
        h.trigger("wrist", 0)
        engine = h.node.pipeline.engine
        before = capsule_hashes(engine)
        assert len(before) == 2
        bad_encoding = image(64, 48, 3)
        bad_encoding.encoding = "yuv422"
        h.send(FRONT, bad_encoding)
        h.send(FRONT, image(48, 48, 4))  # the front camera is configured as 64x48
        short = image(64, 48, 5)
        short.data = bytes(short.data[:-10])  # data length does not match step * height
        h.send(FRONT, short)
        n = h.answers()
        q = Query(stream="no_such_stream", request_id=77)
        h.query_pub.publish(q)
        spin_until(h.ex, lambda: h.answers() > n, 20, "answer to ~/query")
        codes = [(s.stream, s.code) for s in h.statuses]
        assert codes == [("front", Status.BAD_ENCODING), ("front", Status.BAD_SIZE),
                         ("front", Status.BAD_SIZE), ("no_such_stream", Status.UNKNOWN_STREAM)]
        assert h.statuses[-1].request_id == 77 and "no_such_stream" in h.statuses[-1].text
        assert all(s.text for s in h.statuses)
        assert capsule_hashes(engine) == before
        assert len(h.actions) == 2  # no action for a rejected input


def test_use_sim_time_stamps_status_with_the_bag_clock(default_params):
    with running_node(default_params, use_sim_time=True) as h:
        assert h.node.get_parameter("use_sim_time").value is True
        wait_matched(h.ex, h.client, publishers=[h.clock_pub])
        h.clock_pub.publish(Clock(clock=Time(sec=4242, nanosec=5)))
        spin_until(h.ex, lambda: h.node.get_clock().now().nanoseconds > 0, 10, "sim clock")
        bad = image(64, 48, 1)   # stamped 101 s
        bad.encoding = "yuv422"
        h.send(FRONT, bad)       # a status about a message carries that message's stamp
        assert (h.statuses[-1].header.stamp.sec, h.statuses[-1].header.stamp.nanosec) == (101, 0)
        n = h.answers()
        h.query_pub.publish(Query(stream="no_such_stream"))  # unstamped: the node's (sim) clock
        spin_until(h.ex, lambda: h.answers() > n, 20, "answer to ~/query")
        assert (h.statuses[-1].header.stamp.sec, h.statuses[-1].header.stamp.nanosec) == (4242, 5)
