"""Lockstep replay of the bundled bag through the node: deterministic, and equal to offline.

The node and the replayer share one executor in this process, so each context message is taken
before the next trigger (see capsule_ros.ros.replay); across processes DDS does not promise that.
"""
from __future__ import annotations

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.serialization import deserialize_message  # noqa: E402

from capsule_ros.config import load_yaml  # noqa: E402
from capsule_ros.msg import ActionChunk, Status  # noqa: E402
from capsule_ros.offline import run_offline  # noqa: E402
from capsule_ros.ros.launch_args import node_arguments  # noqa: E402
from capsule_ros.ros.node import CapsuleNode  # noqa: E402
from capsule_ros.ros.replay import Replayer  # noqa: E402
from capsule_ros.runtime.outcome import Answer  # noqa: E402
from rosutil import activate, make_executor, ros_context  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.timeout(300)]


def replay_once(params, bag) -> list[ActionChunk]:
    config = load_yaml(params)
    with ros_context() as ctx:
        node = activate(CapsuleNode(context=ctx,
                                    cli_args=node_arguments(params_file=str(params)).cli_args()))
        driver = rclpy.create_node("replay_driver", context=ctx)
        ex = make_executor(ctx, node, driver)
        ns = node.get_fully_qualified_name()
        try:
            result = Replayer(driver, ex, bag, mode="lockstep",
                              triggers=sorted({config.inputs[s.trigger].topic
                                               for s in config.streams.values()}),
                              answers=[f"{ns}/actions", f"{ns}/status"],
                              answer_types=["capsule_ros/msg/ActionChunk", "capsule_ros/msg/Status"],
                              topics=[i.topic for i in config.inputs.values()],
                              wait_timeout=30, answer_timeout=60).run()
        finally:
            node.destroy_node()
            driver.destroy_node()
    statuses = [deserialize_message(a.rawdata, Status) for a in result.answers_on(f"{ns}/status")]
    assert statuses == []
    chunks = [deserialize_message(a.rawdata, ActionChunk) for a in result.answers_on(f"{ns}/actions")]
    assert len(chunks) == result.triggers == 40
    return chunks


def key(c) -> tuple:
    return (c.stream, c.request_id, c.boundary, c.header.stamp.sec, c.header.stamp.nanosec)


def test_lockstep_replay_is_deterministic_and_equals_offline(default_params, demo_bag):
    first = replay_once(default_params, demo_bag)
    second = replay_once(default_params, demo_bag)
    assert [key(c) for c in first] == [key(c) for c in second]
    for a, b in zip(first, second):
        assert list(a.values) == list(b.values)

    offline = [o for o in run_offline(load_yaml(default_params), demo_bag) if isinstance(o, Answer)]
    assert len(offline) == len(first)
    for chunk, answer in zip(first, offline):
        assert (chunk.stream, chunk.request_id, chunk.boundary) == \
               (answer.stream, answer.request_id, answer.position)
        assert chunk.header.stamp.sec * 10**9 + chunk.header.stamp.nanosec == answer.stamp_ns
        np.testing.assert_array_equal(np.array(chunk.values, np.float32), answer.actions.ravel())
