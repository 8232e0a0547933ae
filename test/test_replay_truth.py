"""capsule_replay tells the truth: answers matched to triggers, statuses never counted as answers,
the node's accounting reported, recorded QoS offered, only what should be played is played.

In-process against a small fake of the node's interface (ActionChunk / Status / ~/capsule), so
each claim is checked by counters from bags made here; the real node in its own process is in
test_replay_process.py.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import pytest

rclpy = pytest.importorskip('rclpy')

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402

from bagutil import BEST_EFFORT, demo_items, rosout_raw, tf_raw, write_bag  # noqa: E402
from capsule_ros.msg import ActionChunk, Status, TextChunk  # noqa: E402
from capsule_ros.ros.replay import ReplayError, Replayer, main  # noqa: E402
from capsule_ros.srv import CapsuleOp  # noqa: E402

FRONT, WRIST, JOINTS = '/front_cam/image_raw', '/wrist_cam/image_raw', '/joint_states'
NODE = '/fake/capsule_node'
STREAM_OF = {FRONT: 'front', WRIST: 'wrist'}
pytestmark = [pytest.mark.ros, pytest.mark.timeout(120)]


@dataclass
class FakeNode:
    """Answers each image with an ActionChunk (a Status BAD_SIZE for frame_id 'bad'), stamped
    with the image's stamp, as the capsule node does; ``~/capsule stats`` returns its own
    counters under ``accounting`` (or no such key, like an older node)."""

    ctx: object
    with_accounting: bool = True
    #: this many images vanish before the node sees them (a best-effort sample sent before the
    #: node's reader matched the replayer's writer): neither counted nor answered
    lose_first: int = 0
    reliability_seen: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def __post_init__(self):
        self.node = rclpy.create_node('capsule_node', namespace='/fake', context=self.ctx)
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.actions = self.node.create_publisher(ActionChunk, '~/actions', reliable)
        self.status = self.node.create_publisher(Status, '~/status', reliable)
        self.text = self.node.create_publisher(TextChunk, '~/text', reliable)  # never used
        self.seq = Counter()
        self.node.create_subscription(JointState, JOINTS, lambda m: None, qos_profile_sensor_data)
        for topic in (FRONT, WRIST):
            self.node.create_subscription(Image, topic, lambda m, t=topic: self._image(t, m),
                                          qos_profile_sensor_data)
        self.node.create_service(CapsuleOp, '~/capsule', self._capsule)

    def _count(self, stream: str, key: str) -> None:
        row = self.counts.setdefault(stream, dict.fromkeys(
            ('received', 'answered', 'superseded', 'overflowed', 'stale', 'rejected', 'failed',
             'pending'), 0))
        row[key] += 1

    def _image(self, topic: str, msg: Image) -> None:
        # what the graph says the replayer offers on this topic
        self.reliability_seen.setdefault(topic, {
            i.qos_profile.reliability for i in self.node.get_publishers_info_by_topic(topic)})
        if self.lose_first > 0:
            self.lose_first -= 1
            return
        stream = STREAM_OF[topic]
        self._count(stream, 'received')
        if msg.header.frame_id == 'bad':
            self._count(stream, 'rejected')
            self.status.publish(Status(header=msg.header, stream=stream, input=topic,
                                       code=Status.BAD_SIZE, text='bad'))
            return
        self._count(stream, 'answered')
        self.seq[stream] += 1
        self.actions.publish(ActionChunk(header=msg.header, stream=stream,
                                         seq=self.seq[stream], request_id=self.seq[stream]))

    def _capsule(self, request, response):
        response.ok = True
        stats = {'streams': sorted(STREAM_OF.values())}
        if self.with_accounting:
            stats['accounting'] = self.counts
        response.json = json.dumps(stats)
        return response


@pytest.fixture
def graph(ros):
    executor = SingleThreadedExecutor(context=ros)
    node = rclpy.create_node('replayer', context=ros)
    executor.add_node(node)
    fakes = []

    def fake(**kw) -> FakeNode:
        f = FakeNode(ros, **kw)
        executor.add_node(f.node)
        fakes.append(f)
        return f
    yield executor, node, fake
    executor.shutdown()
    node.destroy_node()
    for f in fakes:
        f.node.destroy_node()


def _with_bad_front(items, index: int):
    """The demo items with the ``index``-th front image marked bad."""
    out, n = [], 0
    for topic, msgtype, stamp, raw in items:
        if topic == FRONT:
            if n == index:
                img = deserialize_message(raw, Image)
                img.header.frame_id = 'bad'
                raw = serialize_message(img)
            n += 1
        out.append((topic, msgtype, stamp, raw))
    return out


def test_a_status_is_never_an_answer_and_the_node_accounting_is_reported(graph, tmp_path,
                                                                          default_params):
    executor, node, fake = graph
    f = fake()
    bag = write_bag(tmp_path / 'bag', _with_bad_front(demo_items(), 7),
                    offers={t: [BEST_EFFORT] for t in (FRONT, WRIST, JOINTS)})
    r = Replayer(node, executor, bag, mode='lockstep', params=default_params, node_name=NODE,
                 wait_timeout=20, answer_timeout=20).run()
    assert r.triggers == 40 and r.status_count == 1 and r.answer_count == 39
    assert r.unanswered == 1 and not r.ok
    front, wrist = r.streams['front'], r.streams['wrist']
    assert (front.triggers, front.answered, front.unanswered) == (20, 19, 1)
    assert front.statuses == {Status.BAD_SIZE: 1}
    assert (wrist.triggers, wrist.answered, wrist.unanswered) == (20, 20, 0)
    assert (front.seq_gaps, wrist.seq_gaps) == (0, 0)
    # the node's own accounting, as the change over the replay
    assert r.accounting['front']['received'] == 20
    assert (r.accounting['front']['answered'], r.accounting['front']['rejected']) == (19, 1)
    assert r.accounting['wrist']['answered'] == 20
    # the bag's recorded best-effort offer is what the node saw on the graph
    assert f.reliability_seen[FRONT] == {ReliabilityPolicy.BEST_EFFORT}


def test_an_older_node_without_accounting_is_reported_not_a_crash(graph, tmp_path,
                                                                  default_params):
    executor, node, fake = graph
    fake(with_accounting=False)
    bag = write_bag(tmp_path / 'bag', demo_items())
    r = Replayer(node, executor, bag, mode='lockstep', params=default_params, node_name=NODE,
                 wait_timeout=20, answer_timeout=20).run()
    assert r.ok and r.answer_count == 40
    assert r.accounting is None and 'no "accounting" key' in r.accounting_note


def test_a_first_trigger_lost_before_the_node_heard_it_is_published_again(graph, tmp_path,
                                                                           default_params):
    """At the start of a replay a best-effort trigger can vanish while the DDS match forms; the
    node's accounting (nothing received) tells the replayer to publish it again, once."""
    executor, node, fake = graph
    f = fake(lose_first=1)
    bag = write_bag(tmp_path / 'bag', demo_items(),
                    offers={t: [BEST_EFFORT] for t in (FRONT, WRIST, JOINTS)})
    r = Replayer(node, executor, bag, mode='lockstep', params=default_params, node_name=NODE,
                 wait_timeout=20, answer_timeout=20, resend_after=0.5).run()
    assert f.lose_first == 0                      # the first image did vanish
    assert r.resent == 1 and any('published again' in w for w in r.warnings)
    assert r.ok and r.triggers == 40 and r.answer_count == 40
    # one query per trigger on the node's side: the resent image was its first
    assert r.accounting['front']['received'] + r.accounting['wrist']['received'] == 40


def test_without_the_node_accounting_a_lost_first_trigger_is_not_guessed_at(graph, tmp_path,
                                                                            default_params):
    """No accounting, no way to tell a lost trigger from a slow answer: nothing is resent (a
    duplicate would be a second query), and the replay says which trigger went unanswered."""
    executor, node, fake = graph
    f = fake(with_accounting=False, lose_first=1)
    bag = write_bag(tmp_path / 'bag', demo_items(),
                    offers={t: [BEST_EFFORT] for t in (FRONT, WRIST, JOINTS)})
    with pytest.raises(ReplayError, match='no answer within 2.0 s to trigger #1') as e:
        Replayer(node, executor, bag, mode='lockstep', params=default_params, node_name=NODE,
                 wait_timeout=20, answer_timeout=2, resend_after=0.5).run()
    assert e.value.result.resent == 0
    assert f.lose_first == 0 and sum(f.seq.values()) == 0   # the one image it got was lost


def test_only_configured_inputs_are_played_and_others_skipped_with_reasons(graph, tmp_path,
                                                                          default_params):
    """A bag like `ros2 bag record -a`: /rosout, a /tf whose type is not installed, the node's
    earlier answers; and no wrist camera (a configured input)."""
    executor, node, fake = graph
    f = fake()
    items = demo_items([JOINTS, FRONT])
    t0 = items[0][2]
    earlier = ActionChunk(stream='front', seq=1)
    earlier.header.stamp.sec = t0 // 10**9
    extra = [('/rosout', 'rcl_interfaces/msg/Log', t0 + 1, rosout_raw(t0 + 1)),
             ('/tf', 'tf2_msgs/msg/TFMessage', t0 + 2, tf_raw(t0 + 2)),
             (f'{NODE}/actions', 'capsule_ros/msg/ActionChunk', t0 + 3,
              serialize_message(earlier))]
    bag = write_bag(tmp_path / 'bag', sorted(items + extra, key=lambda x: x[2]),
                    offers={FRONT: [BEST_EFFORT], JOINTS: [BEST_EFFORT]})
    r = Replayer(node, executor, bag, mode='lockstep', params=default_params, node_name=NODE,
                 wait_timeout=20, answer_timeout=20).run()
    assert r.published_per_topic == {JOINTS: 80, FRONT: 20}
    assert any('/wrist_cam/image_raw' in w and 'replayed without it' in w for w in r.warnings)
    assert r.ok and r.triggers == 20 and r.answer_count == 20   # no earlier answer came back
    assert set(r.streams) == {'front'}

    # every topic of the bag: what cannot or need not be played is skipped, saying why
    r = Replayer(node, executor, bag, mode='lockstep', params=default_params, node_name=NODE,
                 all_topics=True, wait_timeout=20, answer_timeout=20).run()
    assert r.published_per_topic == {JOINTS: 80, FRONT: 20}
    assert 'not installed' in r.skipped['/tf']
    assert 'nobody subscribes' in r.skipped['/rosout']
    assert 'answers' in r.skipped[f'{NODE}/actions']
    assert r.ok and r.answer_count == 20
    assert f.seq['front'] == 40   # both runs' answers, all from the fake


def test_recorded_best_effort_does_not_match_a_reliable_only_subscriber(graph, tmp_path):
    """The offer really is the recorded one: a reliable subscription cannot match it (as with
    ros2 bag play); --qos reliable offers reliable instead."""
    executor, node, _ = graph
    other = rclpy.create_node('strict', context=node.context)
    got = []
    other.create_subscription(JointState, JOINTS, got.append,
                              QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    executor.add_node(other)
    try:
        bag = write_bag(tmp_path / 'bag', demo_items([JOINTS]), offers={JOINTS: [BEST_EFFORT]})
        with pytest.raises(ReplayError, match='subscriber of /joint_states'):
            Replayer(node, executor, bag, mode='lockstep', require_subscribers=[JOINTS],
                     wait_timeout=1.0).run()
        r = Replayer(node, executor, bag, mode='lockstep', require_subscribers=[JOINTS],
                     qos='reliable', wait_timeout=20).run()
        assert r.published == 80
    finally:
        other.destroy_node()


def test_cli_unfinished_recording_exits_1_naming_reindex(tmp_path, capsys):
    from bagutil import make_unfinished
    bag = make_unfinished(write_bag(tmp_path / 'rec', demo_items()))
    assert main([str(bag), '--mode', 'lockstep']) == 1
    err = capsys.readouterr().err
    assert 'ros2 bag reindex' in err and 'Traceback' not in err
