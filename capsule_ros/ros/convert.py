"""Pipeline outcomes <-> ROS messages. The only place that knows both sides' field names."""
from __future__ import annotations

import importlib
from typing import Any

from builtin_interfaces.msg import Time

from ..runtime.outcome import Answer, Failure


def import_type(type_name: str) -> Any:
    """``sensor_msgs/msg/Image`` -> the rclpy message class."""
    pkg, kind, name = type_name.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"message type {type_name!r} is not available: {e}") from e


def time_msg(ns: int) -> Time:
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def _answer_fields(msg: Any, answer: Answer, frame_id: str) -> Any:
    """The fields every answer message shares: stamp, stream, ids, boundary, latency split."""
    msg.header.stamp = time_msg(answer.stamp_ns)
    msg.header.frame_id = frame_id
    msg.stream = answer.stream
    msg.request_id = answer.request_id
    msg.seq = answer.seq
    msg.dropped = answer.dropped
    msg.boundary = answer.position
    msg.encode_ms = float(answer.encode_ms)
    msg.restore_ms = float(answer.restore_ms)
    msg.append_ms = float(answer.append_ms)
    msg.act_ms = float(answer.act_ms)
    msg.commit_ms = float(answer.commit_ms)
    msg.fetch_ms = float(answer.fetch_ms)
    return msg


def to_action_chunk(answer: Answer, frame_id: str = "") -> Any:
    """A continuous head's answer (``answer.output`` is an ``ActionOutput``) as an ``ActionChunk``."""
    from capsule_ros.msg import ActionChunk

    msg = _answer_fields(ActionChunk(), answer, frame_id)
    msg.stamp_is_receive_time = answer.stamp_is_receive_time
    msg.horizon, msg.dof = (int(d) for d in answer.actions.shape)
    msg.names = list(answer.output.columns)
    msg.step_period = float(answer.step_period)
    msg.values = answer.actions.astype("float32").ravel().tolist()
    return msg


def to_text_chunk(answer: Answer, frame_id: str = "") -> Any:
    """A token head's answer (``answer.output`` is a ``TextOutput``) as a ``TextChunk``."""
    from capsule_ros.msg import TextChunk

    msg = _answer_fields(TextChunk(), answer, frame_id)
    msg.text = answer.output.text
    msg.token_ids = [int(t) for t in answer.output.token_ids]
    return msg


def to_status(failure: Failure, now_ns: int) -> Any:
    """A failure as a ``Status``: stamped with the trigger's stamp when it concerns one (so a
    client can match it to what it sent), else with ``now_ns``."""
    from capsule_ros.msg import Status

    msg = Status()
    msg.header.stamp = time_msg(failure.stamp_ns or now_ns)
    msg.stream = failure.stream
    msg.input = failure.input
    msg.request_id = int(failure.request_id)
    msg.code = int(failure.code)
    msg.text = failure.text
    return msg
