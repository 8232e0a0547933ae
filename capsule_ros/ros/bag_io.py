"""Reading and writing ROS 2 bags with ``rosbags`` (pure Python; no rosbag2, no rclpy).

The project records and replays bags itself (there is no ``ros2 bag`` on the development
machine, see ROS_SETUP.md "Bags"). Messages move as raw CDR bytes: what rclpy's
``Publisher.publish(bytes)`` sends and a ``raw=True`` subscription receives are the same bytes
that a bag stores, so replay and recording need no message conversion.

* :func:`read_messages` yields :class:`BagMessage` in bag time order; ``.msg`` is the message
  deserialized by rosbags (same field names as rclpy messages, see below).
* :func:`bag_info` describes the topics (type, count, the QoS their publishers offered), and
  :func:`recorded_offer` turns the recorded QoS into what ``ros2 bag play`` would offer.
* A bag that cannot be read (none at the path, an unfinished recording, a corrupt file) raises
  :class:`BagError` with a message naming the fix (``ros2 bag reindex``), never a rosbags
  traceback.
* :class:`BagRecorder` / :func:`write_messages` write ``(topic, msgtype, timestamp_ns, raw)``
  to a new MCAP bag (rosbag2 metadata version 9).
* :func:`typestore_with` builds a rosbags typestore that also knows this package's own
  messages (``capsule_ros/msg/*``), registered from the ``.msg`` text files, so writing a bag of
  custom types never needs the colcon-generated Python classes.

rosbags messages versus rclpy messages (duck-typing notes for encoders):
  * field names are identical (``header.stamp.sec``/``nanosec``, ``header.frame_id``,
    ``height``, ``width``, ``encoding``, ``step``, ``data``, ``name``, ``position``...);
  * numeric sequences (``uint8[] data``, ``float64[] position``...) are ``numpy.ndarray`` in
    rosbags and ``array.array`` in rclpy (``'B'`` for uint8, ``'d'`` for float64; only
    ``byte[]`` would be ``bytes``) -- ``numpy.asarray(msg.data, numpy.uint8)`` /
    ``numpy.frombuffer(msg.data, numpy.uint8)`` and ``numpy.asarray(msg.position, numpy.float64)``
    work on both; ``len(msg.data)`` works on both;
  * ``string[]`` is a ``list[str]`` in both;
  * rosbags messages are frozen-ish dataclasses without rclpy's type checks; constants
    (``Status.BAD_SIZE``) are class attributes in both.

This module imports neither rclpy nor any generated message package.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE = 'capsule_ros'

#: rosbags type store matching the robots' distribution (message definitions, and thus the
#: RIHS01 type hashes, of std/sensor/builtin msgs are identical in Jazzy and Kilted).
DEFAULT_STORE = 'ros2_jazzy'


# --------------------------------------------------------------------------------------------
# type store
# --------------------------------------------------------------------------------------------

def find_msg_dir() -> Path | None:
    """Directory holding this package's ``.msg`` files, or None.

    Looks in the source checkout (``<repo>/msg``), then in the install tree through
    ``ament_index_python`` (``share/capsule_ros/msg``).
    """
    src = Path(__file__).resolve().parents[2] / 'msg'
    if src.is_dir() and any(src.glob('*.msg')):
        return src
    try:
        from ament_index_python.packages import get_package_share_directory
        share = Path(get_package_share_directory(PACKAGE)) / 'msg'
        if share.is_dir():
            return share
    except Exception:  # noqa: BLE001 - not importable, or package not in the index
        pass
    return None


def package_msg_files(msg_dir: str | Path | None = None,
                      package: str = PACKAGE) -> dict[str, Path]:
    """``{'capsule_ros/msg/Name': path}`` for every ``.msg`` file of the package."""
    d = Path(msg_dir) if msg_dir is not None else find_msg_dir()
    if d is None:
        return {}
    return {f'{package}/msg/{p.stem}': p for p in sorted(Path(d).glob('*.msg'))}


def _base_store(store: str = DEFAULT_STORE):
    from rosbags.typesys import Stores, get_typestore
    return get_typestore(Stores(store))


def typestore_with(msg_files: Mapping[str, str | Path] | None = None, *,
                   include_package: bool = True, store: str = DEFAULT_STORE):
    """A rosbags typestore knowing the standard types plus the given ``.msg`` files.

    ``msg_files`` maps a type name (``'pkg/msg/Name'``) to its ``.msg`` file. With
    ``include_package`` the package's own messages (found by :func:`find_msg_dir`) are added
    too, unless given explicitly. All are registered at once, so they may refer to each other.
    """
    from rosbags.typesys import get_types_from_msg
    ts = _base_store(store)
    files: dict[str, Path] = {}
    if include_package:
        files.update(package_msg_files())
    for name, path in (msg_files or {}).items():
        files[name] = Path(path)
    types: dict[str, Any] = {}
    for name, path in files.items():
        types.update(get_types_from_msg(path.read_text(encoding='utf-8'), name))
    if types:
        ts.register(types)
    return ts


def serialize(msg: Any, msgtype: str, typestore=None) -> bytes:
    """CDR bytes of a rosbags message object."""
    ts = typestore if typestore is not None else typestore_with()
    return bytes(ts.serialize_cdr(msg, msgtype))


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

class BagError(RuntimeError):
    """A bag that cannot be read: no bag at the path, an unfinished recording, a corrupt file.

    The message says what to do (for an unfinished recording: ``ros2 bag reindex``), so tools
    print it instead of a traceback.
    """


def _reindex_hint(path: Path) -> str:
    return (f'it looks like an unfinished recording (the recorder stopped before writing its '
            f'metadata.yaml or the MCAP summary); rebuild them with `ros2 bag reindex {path}` '
            f'on a machine with rosbag2, then replay again')


def _bag_error(path: Path, exc: BaseException) -> BagError:
    """``exc`` from rosbags (opening or reading ``path``) as a :class:`BagError`."""
    if not path.exists():
        return BagError(f'no bag at {path}')
    if path.is_dir() and not (path / 'metadata.yaml').exists():
        files = sorted(p.name for p in path.iterdir() if p.suffix in ('.mcap', '.db3', '.zstd'))
        if files:
            return BagError(f'{path} has storage files ({", ".join(files[:3])}) but no '
                            f'metadata.yaml: {_reindex_hint(path)}')
        return BagError(f'{path} is not a ROS 2 bag (no metadata.yaml, no .mcap/.db3 files)')
    return BagError(f'cannot read bag {path} ({type(exc).__name__}: {exc}); if the recording '
                    f'was interrupted, {_reindex_hint(path)}')


def _reader_errors() -> tuple[type[BaseException], ...]:
    """What rosbags raises for missing, unfinished or corrupt bags."""
    from rosbags.highlevel import AnyReaderError
    from rosbags.rosbag2 import ReaderError
    import sqlite3
    import struct
    return (AnyReaderError, ReaderError, FileNotFoundError, sqlite3.DatabaseError, struct.error,
            EOFError)


@contextmanager
def open_bag(path: str | Path, typestore=None) -> Iterator[Any]:
    """rosbags' ``AnyReader`` on ``path``, opened; rosbags' errors become :class:`BagError`."""
    from rosbags.highlevel import AnyReader
    path = Path(path)
    errors = _reader_errors()
    default = typestore if typestore is not None else typestore_with()
    try:
        reader = AnyReader([path], default_typestore=default)
        reader.open()
    except errors as e:
        raise _bag_error(path, e) from e
    try:
        yield reader
    finally:
        reader.close()


@dataclass
class BagMessage:
    """One message of a bag: raw CDR bytes plus the rosbags-deserialized object (``.msg``)."""

    topic: str
    msgtype: str           # e.g. 'sensor_msgs/msg/Image'
    timestamp_ns: int      # bag (receive/log) time
    rawdata: bytes
    _typestore: Any = field(default=None, repr=False, compare=False)
    _msg: Any = field(default=None, repr=False, compare=False)

    @property
    def msg(self) -> Any:
        """The message deserialized by rosbags (computed on first access)."""
        if self._msg is None:
            self._msg = self._typestore.deserialize_cdr(self.rawdata, self.msgtype)
        return self._msg


def read_messages(path: str | Path, topics: Iterable[str] | None = None, *,
                  eager: bool = False, typestore=None) -> Iterator[BagMessage]:
    """Yield the bag's messages (optionally only ``topics``) in bag time order.

    Types defined in the bag (MCAP schemas / metadata) are registered automatically, so bags of
    custom types written by :class:`BagRecorder` read back without extra setup. ``typestore`` is
    used for bags that carry no definitions. A topic in ``topics`` that the bag lacks is a
    ``KeyError`` (callers that tolerate it intersect with :func:`bag_info` first); a bag that
    cannot be read -- also midway, e.g. a truncated file -- is a :class:`BagError`.
    """
    wanted = None if topics is None else set(topics)
    path = Path(path)
    with open_bag(path, typestore) as reader:
        conns = [c for c in reader.connections if wanted is None or c.topic in wanted]
        if wanted is not None:
            missing = wanted - {c.topic for c in conns}
            if missing:
                raise KeyError(f'topics not in bag {path}: {sorted(missing)}')
        if not conns:
            return
        ts = reader.typestore
        it = reader.messages(connections=conns)
        errors = _reader_errors()
        while True:
            try:
                conn, stamp, raw = next(it)
            except StopIteration:
                return
            except errors as e:  # a chunk that cannot be read: truncated or corrupt
                raise _bag_error(path, e) from e
            m = BagMessage(conn.topic, conn.msgtype, int(stamp), bytes(raw), ts)
            if eager:
                m.msg  # noqa: B018 - deserialize now
            yield m


@dataclass(frozen=True)
class TopicInfo:
    """One topic of a bag as its metadata describes it."""

    topic: str
    msgtype: str
    count: int
    #: the QoS profiles the recorded publishers offered (rosbags ``Qos`` tuples; rosbag2 stores
    #: them as a YAML string in metadata version <= 8 and as a list in version 9 -- rosbags
    #: parses both, and MCAP channel metadata too). Empty when the recorder did not store any.
    offered_qos: tuple[Any, ...] = ()


def bag_info(path: str | Path) -> dict[str, TopicInfo]:
    """``{topic: TopicInfo}`` of a bag (several connections of one topic are merged)."""
    out: dict[str, TopicInfo] = {}
    with open_bag(path) as reader:
        for c in reader.connections:
            qos = tuple(getattr(c.ext, 'offered_qos_profiles', None) or ())
            prev = out.get(c.topic)
            if prev is None:
                out[c.topic] = TopicInfo(c.topic, c.msgtype, int(c.msgcount), qos)
            else:  # same topic recorded through several connections (split files, restarts)
                out[c.topic] = TopicInfo(c.topic, prev.msgtype, prev.count + int(c.msgcount),
                                         prev.offered_qos + qos)
    return out


def bag_topics(path: str | Path) -> dict[str, str]:
    """``{topic: msgtype}`` of a bag."""
    return {t: i.msgtype for t, i in bag_info(path).items()}


@dataclass(frozen=True)
class Offer:
    """What a replayer offers on one topic, from the recorded offers (as ``ros2 bag play``)."""

    reliability: str       # 'reliable' | 'best_effort'
    durability: str        # 'volatile' | 'transient_local'
    note: str = ''         # why the recorded offers were not used, if they were not


def recorded_offer(info: TopicInfo) -> Offer:
    """The offer ``ros2 bag play`` derives from a topic's recorded QoS profiles.

    rosbag2 (``Rosbag2QoS::adapt_offer_to_recorded_offers``): no recorded profile -> its
    default (reliable, volatile); all recorded publishers agreeing on the policies that decide
    compatibility -> their reliability and durability; publishers that disagreed -> the default,
    with a warning. History and depth are the player's own (they do not affect matching).
    """
    profiles = info.offered_qos
    if not profiles:
        return Offer('reliable', 'volatile', 'no QoS recorded: reliable, volatile')

    def key(q: Any) -> tuple:
        return (q.reliability.name, q.durability.name, tuple(q.deadline), q.liveliness.name,
                tuple(q.liveliness_lease_duration))

    if len({key(q) for q in profiles}) > 1:
        return Offer('reliable', 'volatile',
                     f'its {len(profiles)} recorded publishers offered different QoS: '
                     f'reliable, volatile (as ros2 bag play does)')
    q = profiles[0]
    # SYSTEM_DEFAULT / BEST_AVAILABLE / UNKNOWN (old bags) -> rosbag2's default offer
    reliability = 'best_effort' if q.reliability.name == 'BEST_EFFORT' else 'reliable'
    durability = 'transient_local' if q.durability.name == 'TRANSIENT_LOCAL' else 'volatile'
    return Offer(reliability, durability)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

class BagRecorder:
    """Writes raw CDR messages to a new MCAP bag (rosbag2 version 9).

    >>> with BagRecorder('out_bag') as rec:
    ...     rec.write('/topic', 'std_msgs/msg/String', stamp_ns, raw)

    Connections are created on first use of a ``(topic, msgtype)``. Types unknown to the
    standard store must be given through ``msg_files`` (or be this package's own messages).
    ``overwrite`` removes an existing bag directory first (rosbags refuses to overwrite).
    """

    def __init__(self, path: str | Path, *, msg_files: Mapping[str, str | Path] | None = None,
                 typestore=None, overwrite: bool = False):
        from rosbags.rosbag2 import StoragePlugin, Writer
        self.path = Path(path)
        if self.path.exists():
            if not overwrite:
                raise FileExistsError(f'{self.path} exists (pass overwrite=True to replace it)')
            shutil.rmtree(self.path)
        self.typestore = typestore if typestore is not None else typestore_with(msg_files)
        self._writer = Writer(self.path, version=9, storage_plugin=StoragePlugin.MCAP)
        self._conns: dict[tuple[str, str], Any] = {}
        self.count = 0
        self._open = False

    def open(self) -> BagRecorder:
        if not self._open:
            self._writer.open()
            self._open = True
        return self

    def add_topic(self, topic: str, msgtype: str):
        """Declare a connection (also for topics that end up with no messages)."""
        self.open()
        key = (topic, msgtype)
        conn = self._conns.get(key)
        if conn is None:
            if msgtype not in self.typestore.fielddefs:
                raise KeyError(f'message type {msgtype} unknown to the bag typestore; '
                               f'pass its .msg file in msg_files')
            conn = self._writer.add_connection(topic, msgtype, typestore=self.typestore)
            self._conns[key] = conn
        return conn

    def write(self, topic: str, msgtype: str, timestamp_ns: int, raw: bytes | memoryview) -> None:
        conn = self.add_topic(topic, msgtype)
        self._writer.write(conn, int(timestamp_ns), bytes(raw))
        self.count += 1

    def close(self) -> None:
        if self._open:
            self._writer.close()
            self._open = False

    def __enter__(self) -> BagRecorder:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def write_messages(path: str | Path,
                   items: Iterable[tuple[str, str, int, bytes]], *,
                   msg_files: Mapping[str, str | Path] | None = None,
                   typestore=None, overwrite: bool = False) -> int:
    """Write ``(topic, msgtype, timestamp_ns, raw_cdr)`` items to a new MCAP bag.

    Returns the number of messages written.
    """
    with BagRecorder(path, msg_files=msg_files, typestore=typestore,
                     overwrite=overwrite) as rec:
        for topic, msgtype, stamp, raw in items:
            rec.write(topic, msgtype, stamp, raw)
        return rec.count
