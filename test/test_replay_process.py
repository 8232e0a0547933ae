"""capsule_replay and the node in separate processes, as a robot stack runs them.

A bag like a real recording (best-effort QoS recorded, /rosout, a /tf of a type not installed,
the node's earlier answers, no wrist camera) is replayed in lockstep with no settle delay: every
trigger answered, the answers equal the offline run, the node's accounting in the report. A
rejected trigger makes the exit status non-zero. Waits are on the processes' exits (bounded by
generous deadlines); nothing is asserted on elapsed time.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from bagutil import BEST_EFFORT, demo_items, rosout_raw, tf_raw, write_bag  # noqa: E402
from capsule_ros.config import load_yaml  # noqa: E402
from capsule_ros.msg import ActionChunk, Status  # noqa: E402
from capsule_ros.offline import run_offline  # noqa: E402
from capsule_ros.ros import bag_io  # noqa: E402
from capsule_ros.ros.launch_args import node_arguments  # noqa: E402
from capsule_ros.runtime.outcome import Answer  # noqa: E402
from rostools import NODE_PROCESS_ENV, unique_domain  # noqa: E402

FRONT, WRIST, JOINTS = '/front_cam/image_raw', '/wrist_cam/image_raw', '/joint_states'
pytestmark = [pytest.mark.ros, pytest.mark.slow, pytest.mark.timeout(600)]


def start_node(tmp, params):
    """The node (capsule_ros.ros.main, autostart) in its own process and ROS domain; returns
    (process, env, log path, log file)."""
    env = dict(os.environ, **NODE_PROCESS_ENV, ROS_DOMAIN_ID=str(unique_domain()),
               ROS_HOME=str(tmp / 'ros_home'), ROS_LOG_DIR=str(tmp / 'ros_log'))
    log = open(tmp / 'node.log', 'wb')  # noqa: SIM115 - closed by stop_node
    args = node_arguments(params_file=str(params)).cli_args()
    proc = subprocess.Popen([sys.executable, '-P', '-m', 'capsule_ros.ros.main', *args],
                            env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, env, tmp / 'node.log', log


def stop_node(proc, log) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope='module')
def node_env(tmp_path_factory, default_params):
    """The node with the default parameters, shared by the tests of this module."""
    proc, env, path, log = start_node(tmp_path_factory.mktemp('node'), default_params)
    try:
        yield env, path
    finally:
        stop_node(proc, log)


def replay_cli(env, log, *args: str) -> subprocess.CompletedProcess:
    """capsule_replay in its own process; the replayer's discovery waits for the node."""
    try:
        return subprocess.run([sys.executable, '-P', '-m', 'capsule_ros.ros.replay', *args,
                               '--wait-timeout', '240', '--answer-timeout', '120'],
                              env=env, capture_output=True, text=True, timeout=500,
                              start_new_session=True)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f'capsule_replay did not exit; node log:\n'
                             f'{log.read_text()[-3000:]}') from e


def recording_like_bag(path):
    """joints + front camera, recorded best effort, with what `ros2 bag record -a` adds."""
    items = demo_items([JOINTS, FRONT])
    t0 = items[0][2]
    earlier = ActionChunk(stream='front', seq=1, values=[9.0])   # an earlier run's answer
    extra = [('/rosout', 'rcl_interfaces/msg/Log', t0 + 1, rosout_raw(t0 + 1)),
             ('/tf', 'tf2_msgs/msg/TFMessage', t0 + 2, tf_raw(t0 + 2)),
             ('/capsule_node/actions', 'capsule_ros/msg/ActionChunk', t0 + 3,
              serialize_message(earlier))]
    return write_bag(path, sorted(items + extra, key=lambda x: x[2]),
                     offers={FRONT: [BEST_EFFORT], JOINTS: [BEST_EFFORT]})


def test_lockstep_into_a_separate_node_equals_offline(node_env, tmp_path, default_params,
                                                     one_torch_thread):
    env, log = node_env
    bag = recording_like_bag(tmp_path / 'bag')
    out = tmp_path / 'answers'
    r = replay_cli(env, log, str(bag), '--mode', 'lockstep', '--params', str(default_params),
                   '--record', str(out))
    text = r.stdout + r.stderr
    assert r.returncode == 0, f'{text}\nnode log:\n{log.read_text()[-3000:]}'
    assert 'the bag has no /wrist_cam/image_raw' in text
    assert 'stream front: 20 triggers, 20 answered, 0 unanswered' in text
    assert 'node accounting front: received 20, answered 20' in text
    recorded = list(bag_io.read_messages(out))
    assert {m.topic for m in recorded} == {'/capsule_node/actions'}   # no status, no replay
    chunks = [deserialize_message(m.rawdata, ActionChunk) for m in recorded
              if m.topic == '/capsule_node/actions']
    assert len(chunks) == 20 and all(c.stream == 'front' for c in chunks)
    assert [c.seq for c in chunks] == list(range(1, 21))

    offline = [o for o in run_offline(load_yaml(default_params), bag) if isinstance(o, Answer)]
    assert len(offline) == 20
    for chunk, answer in zip(chunks, offline):
        assert (chunk.stream, chunk.request_id, chunk.boundary) == \
               (answer.stream, answer.request_id, answer.position)
        assert chunk.header.stamp.sec * 10**9 + chunk.header.stamp.nanosec == answer.stamp_ns
        np.testing.assert_array_equal(np.array(chunk.values, np.float32), answer.actions.ravel())

    # every topic of the recording: what cannot or need not be played is skipped, saying why
    r = replay_cli(env, log, str(bag), '--mode', 'lockstep', '--params', str(default_params),
                   '--all-topics')
    text = r.stdout + r.stderr
    assert r.returncode == 0, text
    assert 'skipped /tf: its type tf2_msgs/msg/TFMessage is not installed' in text
    assert 'skipped /rosout: nobody subscribes to it' in text
    assert 'skipped /capsule_node/actions' in text
    assert 'stream front: 20 triggers, 20 answered, 0 unanswered' in text


def test_a_rejected_trigger_is_unanswered_and_the_exit_status_says_so(node_env, tmp_path,
                                                                      default_params):
    env, log = node_env
    items, n = [], 0
    for topic, msgtype, stamp, raw in demo_items():
        if topic == FRONT:
            n += 1
            if n == 5:   # a frame of the wrong size: the node rejects it with a status
                img = deserialize_message(raw, Image)
                img.width, img.step = 32, 96
                img.data = bytes(img.height * 96)
                raw = serialize_message(img)
        items.append((topic, msgtype, stamp, raw))
    bag = write_bag(tmp_path / 'bag', items,
                    offers={t: [BEST_EFFORT] for t in (FRONT, WRIST, JOINTS)})
    r = replay_cli(env, log, str(bag), '--mode', 'lockstep', '--params', str(default_params))
    text = r.stdout + r.stderr
    assert r.returncode == 2, f'{text}\nnode log:\n{log.read_text()[-3000:]}'
    assert 'stream front: 20 triggers, 19 answered, 1 unanswered' in text
    assert 'stream wrist: 20 triggers, 20 answered, 0 unanswered' in text
    assert '1 triggers unanswered' in text
    assert 'rejected 1' in text   # the node's accounting agrees


def test_timed_replay_reports_what_the_node_counted(node_env, tmp_path, default_params):
    """Timed, faster than recorded, best effort: whether the node keeps up is the machine's
    business; the report must agree with the node's own accounting either way."""
    import re
    env, log = node_env
    bag = write_bag(tmp_path / 'bag', demo_items(),
                    offers={t: [BEST_EFFORT] for t in (FRONT, WRIST, JOINTS)})
    r = replay_cli(env, log, str(bag), '--mode', 'timed', '--rate', '4', '--params',
                   str(default_params))
    text = r.stdout + r.stderr
    mine = {m[0]: (int(m[1]), int(m[2]), int(m[3])) for m in re.findall(
        r'stream (\w+): (\d+) triggers, (\d+) answered, (\d+) unanswered', text)}
    node = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(
        r'node accounting (\w+): received (\d+), answered (\d+)', text)}
    assert set(mine) == set(node) == {'front', 'wrist'}, text
    for stream, (triggers, answered, unanswered) in mine.items():
        received, node_answered = node[stream]
        assert triggers == 20 and answered + unanswered == triggers
        assert answered == node_answered     # every answer the node counted arrived here
        assert received <= triggers          # best effort may lose some on the way, never add
    assert 'does not add up' not in text
    assert r.returncode == (0 if all(u == 0 for _, _, u in mine.values()) else 2), text


def test_lockstep_across_rebases_equals_offline(tmp_path, default_params, one_torch_thread):
    """A context small enough that the streams rebase: the CONTEXT_REBASED statuses settle
    nothing away -- every trigger still gets its answer, equal to the offline run's."""
    import yaml
    doc = yaml.safe_load(default_params.read_text())
    params = doc['/**/capsule_node']['ros__parameters']
    params['model']['max_context'] = 128
    params['capsules']['context_policy'] = 'rebase'
    params_file = tmp_path / 'small_context.yaml'
    params_file.write_text(yaml.safe_dump(doc))
    node_dir = tmp_path / 'node'
    node_dir.mkdir()
    proc, env, log, log_file = start_node(node_dir, params_file)
    try:
        bag = write_bag(tmp_path / 'bag', demo_items(),
                        offers={t: [BEST_EFFORT] for t in (FRONT, WRIST, JOINTS)})
        out = tmp_path / 'answers'
        r = replay_cli(env, log, str(bag), '--mode', 'lockstep', '--params', str(params_file),
                       '--record', str(out))
    finally:
        stop_node(proc, log_file)
    text = r.stdout + r.stderr
    assert r.returncode == 0, f'{text}\nnode log:\n{log.read_text()[-3000:]}'
    recorded = list(bag_io.read_messages(out))
    chunks = [deserialize_message(m.rawdata, ActionChunk) for m in recorded
              if m.topic == '/capsule_node/actions']
    statuses = [m for m in recorded if m.topic == '/capsule_node/status']
    offline = run_offline(load_yaml(params_file), bag)
    answers = [o for o in offline if isinstance(o, Answer)]
    rebased = [o for o in offline if not isinstance(o, Answer)]
    assert rebased, 'the context is not small enough to rebase: the test checks nothing'
    assert {int(f.code) for f in rebased} == {Status.CONTEXT_REBASED}
    assert sorted((m.msg.stream, m.msg.code) for m in statuses) == \
        sorted((f.stream, int(f.code)) for f in rebased)
    assert len(chunks) == len(answers) == 40
    for chunk, answer in zip(sorted(chunks, key=lambda c: (c.stream, c.seq)),
                             sorted(answers, key=lambda a: (a.stream, a.seq))):
        assert (chunk.stream, chunk.request_id, chunk.boundary) == \
               (answer.stream, answer.request_id, answer.position)
        np.testing.assert_array_equal(np.array(chunk.values, np.float32), answer.actions.ravel())
