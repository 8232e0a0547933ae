"""The committed demo bag and the rosbags-based bag I/O (no ROS graph needed)."""

from __future__ import annotations

import importlib.util
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from capsule_ros.ros import bag_io

REPO = Path(__file__).resolve().parents[1]
DEMO_BAG = REPO / 'test' / 'data' / 'demo_bag'
EPOCH_NS = 1_700_000_000 * 1_000_000_000
FRONT, WRIST, JOINTS = '/front_cam/image_raw', '/wrist_cam/image_raw', '/joint_states'


def _load_script():
    spec = importlib.util.spec_from_file_location('make_demo_bag',
                                                  REPO / 'scripts' / 'make_demo_bag.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _by_topic(path):
    out = defaultdict(list)
    for m in bag_io.read_messages(path):
        out[m.topic].append(m)
    return out


def test_committed_bag_feeds_every_configured_input_and_stays_small(default_params):
    from capsule_ros.config import load_yaml
    topics = {spec.topic for spec in load_yaml(default_params).inputs.values()}
    assert topics <= set(_by_topic(DEMO_BAG))  # make demo answers from this bag alone
    size = sum(p.stat().st_size for p in DEMO_BAG.rglob('*') if p.is_file())
    assert size < 2 * 1024 * 1024  # the repo stays small


def test_committed_bag_content():
    msgs = list(bag_io.read_messages(DEMO_BAG))
    stamps = [m.timestamp_ns for m in msgs]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)  # no ties
    assert Counter(m.topic for m in msgs) == {JOINTS: 80, FRONT: 20, WRIST: 20}
    assert bag_io.bag_topics(DEMO_BAG) == {JOINTS: 'sensor_msgs/msg/JointState',
                                           FRONT: 'sensor_msgs/msg/Image',
                                           WRIST: 'sensor_msgs/msg/Image'}
    by = _by_topic(DEMO_BAG)
    for m in msgs:  # header stamp == bag time
        h = m.msg.header.stamp
        assert h.sec * 1_000_000_000 + h.nanosec == m.timestamp_ns
    f = by[FRONT][0].msg
    assert (f.encoding, f.width, f.height, f.step, f.header.frame_id) == \
        ('rgb8', 64, 48, 192, 'front_cam')
    assert f.data.dtype == np.uint8 and f.data.size == 48 * 192
    w = by[WRIST][0].msg
    assert (w.encoding, w.width, w.height, w.step, w.header.frame_id) == \
        ('bgr8', 48, 48, 144, 'wrist_cam')
    j = by[JOINTS][0].msg
    assert list(j.name) == [f'joint_{i}' for i in range(1, 8)]
    assert len(j.position) == len(j.velocity) == len(j.effort) == 7
    # timing: joints 20 Hz from the epoch, front 5 Hz from +10 ms, wrist 100 ms after front
    assert by[JOINTS][0].timestamp_ns == EPOCH_NS
    assert by[JOINTS][-1].timestamp_ns == EPOCH_NS + 79 * 50_000_000
    assert by[FRONT][0].timestamp_ns == EPOCH_NS + 10_000_000
    assert by[FRONT][-1].timestamp_ns == EPOCH_NS + 10_000_000 + 19 * 200_000_000
    assert [b.timestamp_ns - a.timestamp_ns for a, b in zip(by[FRONT], by[WRIST])] == \
        [100_000_000] * 20
    # the pattern moves: consecutive frames differ
    frames = [m.msg.data for m in by[FRONT]]
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))


def test_regenerated_bag_matches_committed(tmp_path):
    mod = _load_script()
    out = tmp_path / 'demo_bag'
    assert mod.main(['--out', str(out)]) == 0
    new, old = _by_topic(out), _by_topic(DEMO_BAG)
    assert {t: len(v) for t, v in new.items()} == {t: len(v) for t, v in old.items()}
    for topic in old:
        for a, b in zip(new[topic], old[topic]):
            assert a.timestamp_ns == b.timestamp_ns and a.msgtype == b.msgtype
            ma, mb = a.msg, b.msg
            assert (ma.header.stamp.sec, ma.header.stamp.nanosec, ma.header.frame_id) == \
                (mb.header.stamp.sec, mb.header.stamp.nanosec, mb.header.frame_id)
            if a.msgtype == 'sensor_msgs/msg/Image':
                assert (ma.encoding, ma.width, ma.height, ma.step) == \
                    (mb.encoding, mb.width, mb.height, mb.step)
                diff = np.abs(ma.data.astype(int) - mb.data.astype(int))
                assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # libm ulps at most
            else:
                assert list(ma.name) == list(mb.name)
                for fld in ('position', 'velocity', 'effort'):
                    np.testing.assert_allclose(getattr(ma, fld), getattr(mb, fld),
                                               rtol=0, atol=1e-12)
    with pytest.raises(FileExistsError):
        mod.main(['--out', str(out)])
    assert mod.main(['--out', str(out), '--force', '--seconds', '1']) == 0
    assert Counter(m.topic for m in bag_io.read_messages(out)) == {JOINTS: 20, FRONT: 5,
                                                                   WRIST: 5}


def test_custom_types_roundtrip(tmp_path):
    files = bag_io.package_msg_files()
    assert 'capsule_ros/msg/Status' in files and 'capsule_ros/msg/ActionChunk' in files
    ts = bag_io.typestore_with()
    T = ts.types
    header = T['std_msgs/msg/Header'](stamp=T['builtin_interfaces/msg/Time'](sec=5, nanosec=7),
                                      frame_id='f')
    status = T['capsule_ros/msg/Status'](header=header, stream='front', input='front_cam',
                                         request_id=3,
                                         code=T['capsule_ros/msg/Status'].BAD_SIZE, text='x')
    chunk = T['capsule_ros/msg/ActionChunk'](
        header=header, stream='front', request_id=3, seq=3, dropped=0, boundary=17,
        stamp_is_receive_time=False, horizon=2, dof=3, names=['x', 'y', 'yaw'], step_period=0.1,
        values=np.arange(6, dtype=np.float32),
        fetch_ms=0.0, encode_ms=0.1, restore_ms=0.5, append_ms=1.0, act_ms=2.0, commit_ms=0.25)
    items = [('/capsule_node/status', 'capsule_ros/msg/Status', 10,
              bag_io.serialize(status, 'capsule_ros/msg/Status', ts)),
             ('/capsule_node/actions', 'capsule_ros/msg/ActionChunk', 20,
              bag_io.serialize(chunk, 'capsule_ros/msg/ActionChunk', ts))]
    out = tmp_path / 'out'
    assert bag_io.write_messages(out, items) == 2
    back = list(bag_io.read_messages(out))
    assert [(m.topic, m.msgtype, m.timestamp_ns, m.rawdata) for m in back] == items
    assert back[0].msg.code == 101 and back[0].msg.text == 'x'
    assert back[1].msg.values.tolist() == [0, 1, 2, 3, 4, 5] and back[1].msg.boundary == 17
    # a fresh reader (default typestore without the package) gets the types from the bag
    back2 = list(bag_io.read_messages(out, typestore=bag_io.typestore_with(
        include_package=False)))
    assert back2[1].msg.stream == 'front'
    with pytest.raises(KeyError):
        list(bag_io.read_messages(out, topics=['/nope']))
    with pytest.raises(FileExistsError):
        bag_io.write_messages(out, items[:1])
    assert bag_io.write_messages(out, items[:1], overwrite=True) == 1
    with bag_io.BagRecorder(tmp_path / 'bad', typestore=bag_io.typestore_with(
            include_package=False)) as rec:
        with pytest.raises(KeyError):
            rec.write('/t', 'capsule_ros/msg/Status', 1, items[0][3])


def test_rosbags_and_rclpy_messages_share_field_names():
    """Encoders duck-type both: check the fields they use agree."""
    rclpy_ser = pytest.importorskip('rclpy.serialization')
    from sensor_msgs.msg import Image, JointState
    by = _by_topic(DEMO_BAG)
    for topic, cls in ((FRONT, Image), (WRIST, Image), (JOINTS, JointState)):
        m = by[topic][3]
        a, b = m.msg, rclpy_ser.deserialize_message(m.rawdata, cls)
        assert (a.header.stamp.sec, a.header.stamp.nanosec, a.header.frame_id) == \
            (b.header.stamp.sec, b.header.stamp.nanosec, b.header.frame_id)
        if cls is Image:
            for fld in ('height', 'width', 'encoding', 'step', 'is_bigendian'):
                assert getattr(a, fld) == getattr(b, fld)
            # rosbags: numpy uint8 array; rclpy: array.array('B'); both convert the same way
            assert np.array_equal(np.asarray(a.data, np.uint8), np.asarray(b.data, np.uint8))
            assert np.array_equal(np.frombuffer(a.data, np.uint8),
                                  np.frombuffer(b.data, np.uint8))
        else:
            assert list(a.name) == list(b.name)
            for fld in ('position', 'velocity', 'effort'):
                assert np.array_equal(np.asarray(getattr(a, fld), np.float64),
                                      np.asarray(getattr(b, fld), np.float64))


# ------------------------------------------------------------------ recorded QoS, unfinished bags
from bagutil import BEST_EFFORT, demo_items, make_unfinished, qos, write_bag  # noqa: E402


def _string_raw(text: str) -> bytes:
    ts = bag_io.typestore_with()
    return bag_io.serialize(ts.types['std_msgs/msg/String'](data=text), 'std_msgs/msg/String', ts)


@pytest.mark.parametrize('storage,version', [('mcap', 9), ('sqlite3', 9), ('mcap', 8),
                                             ('sqlite3', 8)])
def test_recorded_qos_is_read_as_rosbag2_writes_it(tmp_path, storage, version):
    import yaml
    raw = _string_raw('x')
    items = [(t, 'std_msgs/msg/String', i + 1, raw)
             for i, t in enumerate(('/cam', '/map', '/plain', '/mixed'))]
    bag = write_bag(tmp_path / 'b', items, storage=storage, version=version, offers={
        '/cam': [BEST_EFFORT],
        '/map': [qos('reliable', 'transient_local', depth=1)],
        '/mixed': [BEST_EFFORT, qos('reliable')]})   # two recorded publishers that disagreed
    # the metadata holds the profiles the way rosbag2 writes them: a YAML string up to version 8
    # (Humble/Iron: integer enums), a list of mappings from version 9 (Jazzy: names)
    meta = yaml.safe_load((bag / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
    stored = {t['topic_metadata']['name']: t['topic_metadata']['offered_qos_profiles']
              for t in meta['topics_with_message_count']}
    if version >= 9:
        assert stored['/cam'][0]['reliability'] == 'best_effort'
    else:
        assert isinstance(stored['/cam'], str) and 'reliability: 2' in stored['/cam']
    info = bag_io.bag_info(bag)
    assert {t: i.count for t, i in info.items()} == {'/cam': 1, '/map': 1, '/plain': 1,
                                                     '/mixed': 1}
    offer = {t: bag_io.recorded_offer(i) for t, i in info.items()}
    assert (offer['/cam'].reliability, offer['/cam'].durability) == ('best_effort', 'volatile')
    assert (offer['/map'].reliability, offer['/map'].durability) == ('reliable', 'transient_local')
    # nothing recorded, or publishers that disagreed: ros2 bag play's default, and why
    for topic in ('/plain', '/mixed'):
        assert (offer[topic].reliability, offer[topic].durability) == ('reliable', 'volatile')
        assert offer[topic].note
    assert not offer['/cam'].note


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_unfinished_recording_is_a_clean_error_naming_reindex(tmp_path, storage):
    bag = make_unfinished(write_bag(tmp_path / 'rec', demo_items(), storage=storage))
    for call in (lambda: bag_io.bag_info(bag), lambda: list(bag_io.read_messages(bag)),
                 lambda: bag_io.bag_topics(bag)):
        with pytest.raises(bag_io.BagError, match='ros2 bag reindex'):
            call()


def test_mcap_without_summary_is_a_clean_error_naming_reindex(tmp_path):
    """metadata.yaml present (an earlier split), the MCAP cut before its summary and footer."""
    bag = make_unfinished(write_bag(tmp_path / 'rec', demo_items()), keep_metadata=True)
    with pytest.raises(bag_io.BagError, match='ros2 bag reindex'):
        list(bag_io.read_messages(bag))


def test_missing_or_foreign_path_is_a_clean_error(tmp_path):
    with pytest.raises(bag_io.BagError, match='no bag at'):
        bag_io.bag_info(tmp_path / 'nothing')
    (tmp_path / 'notes').mkdir()
    with pytest.raises(bag_io.BagError, match='not a ROS 2 bag'):
        bag_io.bag_info(tmp_path / 'notes')
