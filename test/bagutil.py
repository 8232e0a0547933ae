"""Making test bags with rosbags: recorded QoS, extra topics, unfinished recordings."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness, QosReliability,
                                QosTime)
from rosbags.rosbag2 import StoragePlugin, Writer

from capsule_ros.ros import bag_io

REPO = Path(__file__).resolve().parents[1]
DEMO_BAG = REPO / "test" / "data" / "demo_bag"


def qos(reliability: str = "best_effort", durability: str = "volatile", depth: int = 5) -> Qos:
    """A recorded publisher offer as rosbag2 stores it (the sensor-data profile by default)."""
    zero = QosTime(0, 0)
    return Qos(QosHistory.KEEP_LAST, depth, QosReliability[reliability.upper()],
               QosDurability[durability.upper()], zero, zero, QosLiveliness.AUTOMATIC, zero, False)


BEST_EFFORT = qos()


def demo_items(topics: Iterable[str] | None = None) -> list[tuple[str, str, int, bytes]]:
    """(topic, msgtype, bag time, raw) of the committed demo bag."""
    wanted = None if topics is None else set(topics)
    return [(m.topic, m.msgtype, m.timestamp_ns, m.rawdata)
            for m in bag_io.read_messages(DEMO_BAG) if wanted is None or m.topic in wanted]


def write_bag(path: Path, items: Iterable[tuple[str, str, int, bytes]], *,
              offers: dict[str, list[Qos]] | None = None, version: int = 9,
              storage: str = "mcap", typestore=None) -> Path:
    """A rosbag2 bag of ``items`` with ``offers`` as each topic's offered_qos_profiles."""
    ts = typestore if typestore is not None else bag_io.typestore_with()
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    offers = offers or {}
    conns = {}
    with Writer(path, version=version, storage_plugin=plugin) as writer:
        for topic, msgtype, stamp, raw in items:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=ts,
                                                     offered_qos_profiles=offers.get(topic, []))
            writer.write(conns[topic], stamp, raw)
    return path


def rosout_raw(stamp_ns: int, text: str = "hello") -> bytes:
    ts = bag_io.typestore_with()
    T = ts.types
    log = T["rcl_interfaces/msg/Log"](
        stamp=T["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9),
        level=20, name="driver", msg=text, file="f.cpp", function="fn", line=1)
    return bag_io.serialize(log, "rcl_interfaces/msg/Log", ts)


def tf_raw(stamp_ns: int) -> bytes:
    """A tf2_msgs/TFMessage (a type this venv does not install)."""
    ts = bag_io.typestore_with()
    T = ts.types
    stamp = T["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    tf = T["geometry_msgs/msg/TransformStamped"](
        header=T["std_msgs/msg/Header"](stamp=stamp, frame_id="base"), child_frame_id="cam",
        transform=T["geometry_msgs/msg/Transform"](
            translation=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=1.0),
            rotation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0)))
    return bag_io.serialize(T["tf2_msgs/msg/TFMessage"](transforms=[tf]), "tf2_msgs/msg/TFMessage", ts)


def make_unfinished(bag: Path, *, keep_metadata: bool = False) -> Path:
    """What a killed recorder leaves: no metadata.yaml (unless kept) and, for MCAP, a file cut
    before its summary and footer."""
    if not keep_metadata:
        (bag / "metadata.yaml").unlink()
    for f in bag.glob("*.mcap"):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) * 2 // 3])
    return bag
