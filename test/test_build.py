"""The colcon build works: the package and its generated interfaces import from install/."""
import os

import pytest


def test_package_resolves_to_install_tree():
    import capsule_ros

    path = os.path.realpath(capsule_ros.__file__)
    assert f"{os.sep}install{os.sep}" in path, (
        f"capsule_ros imported from {path}, not the colcon install tree; "
        "source scripts/env.sh and run pytest via the venv's pytest executable")


def test_status_constants_match_the_codes_the_node_publishes():
    """Status.msg's constants (what a client compares against) and status_codes.Code (what the
    node publishes) are written separately: every code must exist in both with one value."""
    from capsule_ros.msg import Status
    from capsule_ros.status_codes import Code

    generated = {name: getattr(Status, name) for name in dir(Status)
                 if name.isupper() and isinstance(getattr(Status, name), int)}
    assert generated == {c.name: int(c) for c in Code}


def test_action_chunk_serialization_roundtrip():
    from rclpy.serialization import deserialize_message, serialize_message

    from capsule_ros.msg import ActionChunk

    msg = ActionChunk()
    msg.header.stamp.sec = 12
    msg.header.stamp.nanosec = 345
    msg.header.frame_id = "base_link"
    msg.stream = "front"
    msg.request_id = 7
    msg.boundary = 1024
    msg.stamp_is_receive_time = True
    msg.horizon = 2
    msg.dof = 3
    msg.step_period = 0.0625  # exact in float32, so == holds after the round trip
    msg.values = [0.0, 0.5, -1.0, 2.0, 3.25, -4.5]
    msg.restore_ms = 0.25
    msg.append_ms = 1.5
    msg.act_ms = 3.0
    msg.prev_commit_ms = 0.125

    data = serialize_message(msg)
    assert isinstance(data, bytes) and len(data) > 0
    back = deserialize_message(data, ActionChunk)
    assert back == msg
    assert list(back.values) == pytest.approx([0.0, 0.5, -1.0, 2.0, 3.25, -4.5])
    assert back.header.frame_id == "base_link" and back.header.stamp.nanosec == 345
