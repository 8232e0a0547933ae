"""Bag replay with rclpy: ``capsule_replay`` (there is no ``ros2 bag play`` here, see ROS_SETUP.md).

Reads a bag with rosbags (:mod:`capsule_ros.ros.bag_io`) and publishes every message's CDR
bytes unchanged (``publisher.publish(bytes(raw))``), preceded by a ``/clock`` message carrying
the bag time (so a node with ``use_sim_time`` follows the bag). What the node publishes on the
*answer* topics is received with ``raw=True`` subscriptions and optionally recorded to an MCAP
bag.

Modes
  * ``timed``: the bag's relative timing, scaled by ``rate`` (2.0 = twice as fast).
  * ``lockstep``: bag order as fast as possible, except that after each message on a *trigger*
    topic it waits (spinning the executor) until ``answers_per_trigger`` answers (messages on
    any answer topic) have arrived; no answer within ``answer_timeout`` is an error. Recorded
    answers are stamped with the bag time of the trigger they follow, so two lockstep replays
    against a deterministic node record identical bags. After each other message the executor
    is spun until two waits have passed (a guard condition of the replayer's node fires twice),
    so an in-process node on the same executor has taken each context message before the next
    one (and the next trigger) is published. Across processes this cannot be guaranteed: the
    node should create its context subscriptions before its trigger subscriptions (rclpy's
    executor serves ready subscriptions of a node in creation order); ``settle`` adds a short
    spin after each context message as a heuristic.

Before publishing anything, the replayer waits (spinning, bounded by ``wait_timeout``, never a
bare sleep) until each publisher of the ``require_subscribers`` topics has a matched subscriber
and each answer topic has a publisher. Publishers are reliable with a deep history
(``depth``); answer subscriptions are reliable too.

Library use (in-process, shared executor)::

    replayer = Replayer(node, executor, 'test/data/demo_bag', mode='lockstep',
                        triggers=['/front_cam/image_raw'], answers=['/capsule_node/actions'],
                        answer_types=['capsule_ros/msg/ActionChunk'], record='out_bag')
    result = replayer.run()   # call from the thread that owns the executor, not a callback
"""

from __future__ import annotations

import argparse
import importlib
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

from capsule_ros.ros import bag_io

CLOCK_TOPIC = '/clock'
CLOCK_TYPE = 'rosgraph_msgs/msg/Clock'
MODES = ('lockstep', 'timed')


class ReplayError(RuntimeError):
    """Discovery or answer timeout, or a bad option; ``.result`` holds what was done so far."""

    def __init__(self, message: str, result: ReplayResult | None = None):
        super().__init__(message)
        self.result = result


class Answer(NamedTuple):
    topic: str
    timestamp_ns: int   # bag time when it arrived (lockstep: the stamp of the last trigger)
    rawdata: bytes      # CDR bytes as published by the node


@dataclass
class ReplayOptions:
    mode: str = 'lockstep'
    rate: float = 1.0                               # timed mode speed factor
    triggers: Sequence[str] = ()                    # lockstep waits for answers after these
    answers: Sequence[str] = ()                     # topics the node answers on
    #: types of the answer topics: a mapping topic -> 'pkg/msg/Name', or a list aligned with
    #: ``answers``; a topic left out gets its type from the ROS graph once its publisher shows up
    answer_types: Mapping[str, str] | Sequence[str] | None = None
    answers_per_trigger: int = 1
    record: str | Path | None = None                # output MCAP bag (answers)
    record_inputs: bool = False                     # also record the replayed messages
    overwrite: bool = False                         # replace an existing ``record`` directory
    msg_files: Mapping[str, str | Path] | None = None  # extra .msg files for the output bag
    clock: bool = True                              # publish /clock before each message
    topics: Sequence[str] | None = None             # bag topics to publish (None: all)
    #: topics whose publisher must have a matched subscriber before starting
    #: (None: every published topic; '/clock' may be listed too)
    require_subscribers: Sequence[str] | None = None
    wait_timeout: float = 10.0                      # discovery, seconds
    answer_timeout: float = 10.0                    # per trigger (lockstep) / for all (timed)
    drain: float = 0.0                              # spin this long after the last message
    depth: int = 1000                               # publisher / subscription history depth
    ack_timeout: float = 0.3                        # at the end: wait for acks, all pubs, s
    flush: bool = True                              # lockstep: let the executor take each message
    #: lockstep: also spin this long after each non-trigger message -- a heuristic for nodes in
    #: another process, where a context message sent just before a trigger may be taken after it
    settle: float = 0.0


@dataclass
class ReplayResult:
    published: int = 0                              # bag messages published (no /clock)
    published_per_topic: dict[str, int] = field(default_factory=dict)
    clock_published: int = 0
    triggers: int = 0                               # trigger messages published
    answers: list[Answer] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)  # lockstep: trigger -> answer(s)
    elapsed_s: float = 0.0                          # from first publish to the end
    discovery_s: float = 0.0
    bag_duration_s: float = 0.0                     # span of the published messages
    record: Path | None = None

    def answers_on(self, topic: str) -> list[Answer]:
        return [a for a in self.answers if a.topic == topic]


def import_msg_class(msgtype: str):
    """``'pkg/msg/Name'`` -> the generated rclpy class ``pkg.msg.Name``."""
    parts = msgtype.split('/')
    if len(parts) != 3:
        raise ValueError(f'message type must look like pkg/msg/Name, got {msgtype!r}')
    pkg, sub, name = parts
    try:
        module = importlib.import_module(f'{pkg}.{sub}')
        return getattr(module, name)
    except (ImportError, AttributeError) as e:
        raise ReplayError(f'cannot import the Python class of {msgtype} ({e}); is the package '
                          f'built and on PYTHONPATH?') from e


def _normalize_answer_types(answers: Sequence[str], types) -> dict[str, str]:
    if types is None:
        return {}
    if isinstance(types, Mapping):
        return dict(types)
    types = list(types)
    if len(types) != len(answers):
        raise ReplayError(f'{len(types)} answer types for {len(answers)} answer topics')
    return dict(zip(answers, types))


class Replayer:
    """Replays one bag through ``node`` (which the caller created) on ``executor``.

    ``executor`` may be None: a SingleThreadedExecutor on the node's context is made. The node
    is added to the executor if it is not in it yet. Options are :class:`ReplayOptions` fields,
    given as ``options`` and/or keyword overrides. Publishers and subscriptions are created in
    :meth:`run` and destroyed at its end, so ``run`` may be called again.
    """

    def __init__(self, node, executor, bag: str | Path,
                 options: ReplayOptions | None = None, **overrides: Any):
        names = {f.name for f in fields(ReplayOptions)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f'unknown replay options: {sorted(unknown)}')
        self.options = replace(options or ReplayOptions(), **overrides)
        o = self.options
        if o.mode not in MODES:
            raise ReplayError(f'mode must be one of {MODES}, got {o.mode!r}')
        if o.rate <= 0:
            raise ReplayError(f'rate must be > 0, got {o.rate}')
        self.node = node
        if executor is None:
            from rclpy.executors import SingleThreadedExecutor
            executor = SingleThreadedExecutor(context=node.context)
        self.executor = executor
        self.bag = Path(bag)
        self.bag_types = bag_io.bag_topics(self.bag)
        self.topics = list(self.bag_types) if o.topics is None else list(o.topics)
        missing = [t for t in self.topics if t not in self.bag_types]
        if missing:
            raise ReplayError(f'topics not in bag {self.bag}: {missing}')
        self.topics = [t for t in self.topics if t != CLOCK_TOPIC or not o.clock]
        bad = [t for t in o.triggers if t not in self.topics]
        if bad:
            raise ReplayError(f'trigger topics not replayed from the bag: {bad}')
        self.answer_types = _normalize_answer_types(list(o.answers), o.answer_types)
        self.required = (list(self.topics) if o.require_subscribers is None
                         else list(o.require_subscribers))
        bad = [t for t in self.required if t not in self.topics and t != CLOCK_TOPIC]
        if bad:
            raise ReplayError(f'require_subscribers names topics that are not published: {bad}')
        if CLOCK_TOPIC in self.required and not o.clock:
            raise ReplayError('/clock is required but clock publishing is off')
        self._lock = threading.Lock()
        self._answers: list[Answer] = []
        self._bag_now = 0
        self._recorder: bag_io.BagRecorder | None = None
        self._pubs: dict[str, Any] = {}
        self._subs: dict[str, Any] = {}
        self._clock_pub = None
        self._wall0: float | None = None
        self._t_first = 0
        self._guard = None
        self._guard_fired = 0

    # ---------------------------------------------------------------- entities
    def _qos(self):
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.options.depth,
                          reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)

    def _create_entities(self) -> None:
        qos = self._qos()
        for topic in self.topics:
            cls = import_msg_class(self.bag_types[topic])
            self._pubs[topic] = self.node.create_publisher(cls, topic, qos)
        if self.options.clock:
            from rosgraph_msgs.msg import Clock
            self._clock_pub = self.node.create_publisher(Clock, CLOCK_TOPIC, qos)
        for topic in self.options.answers:
            if topic in self.answer_types:
                self._subscribe_answer(topic, self.answer_types[topic])
        if self.options.mode == 'lockstep' and self.options.flush:
            self._guard = self.node.create_guard_condition(self._on_guard)

    def _subscribe_answer(self, topic: str, msgtype: str) -> None:
        cls = import_msg_class(msgtype)
        self.answer_types[topic] = msgtype

        def callback(raw: bytes, topic: str = topic) -> None:
            self._on_answer(topic, raw)

        self._subs[topic] = self.node.create_subscription(cls, topic, callback, self._qos(),
                                                          raw=True)
        if self._recorder is not None:
            self._recorder.add_topic(topic, msgtype)

    def _destroy_entities(self) -> None:
        from rclpy.duration import Duration
        deadline = time.monotonic() + self.options.ack_timeout
        for pub in list(self._pubs.values()) + ([self._clock_pub] if self._clock_pub else []):
            # let reliable data reach late readers before the writer goes (bounded, shared)
            remaining = deadline - time.monotonic()
            wait_acked = getattr(pub, 'wait_for_all_acked', None)
            if wait_acked is not None and remaining > 0:
                try:
                    wait_acked(Duration(nanoseconds=int(remaining * 1e9)))
                except Exception:  # noqa: BLE001 - best effort before destroying
                    pass
            self.node.destroy_publisher(pub)
        for sub in self._subs.values():
            self.node.destroy_subscription(sub)
        if self._guard is not None:
            self.node.destroy_guard_condition(self._guard)
            self._guard = None
        self._pubs.clear()
        self._subs.clear()
        self._clock_pub = None

    def _on_guard(self) -> None:
        self._guard_fired += 1

    def _flush(self) -> None:
        """Spin until the executor has waited twice after this point: every callback ready
        now (in-process deliveries are synchronous) has run."""
        for _ in range(2):
            target = self._guard_fired + 1
            self._guard.trigger()
            deadline = time.monotonic() + 1.0
            while self._guard_fired < target and time.monotonic() < deadline:
                self.executor.spin_once(timeout_sec=0.05)

    def _on_answer(self, topic: str, raw: bytes) -> None:
        if self.options.mode == 'timed' and self._wall0 is not None:
            est = self._t_first + int((time.monotonic() - self._wall0) * self.options.rate * 1e9)
            stamp = max(self._bag_now, est)
        else:
            stamp = self._bag_now
        answer = Answer(topic, stamp, bytes(raw))
        with self._lock:
            self._answers.append(answer)
            if self._recorder is not None:
                self._recorder.write(topic, self.answer_types[topic], stamp, answer.rawdata)

    def _answer_count(self) -> int:
        with self._lock:
            return len(self._answers)

    # ---------------------------------------------------------------- waiting
    def _publisher_count(self, topic: str) -> int:
        sub = self._subs.get(topic)
        if sub is not None and hasattr(sub, 'get_publisher_count'):
            return sub.get_publisher_count()          # matched publishers (rclpy >= Kilted)
        return self.node.count_publishers(topic)     # graph publishers (Jazzy)

    def _missing(self) -> list[str]:
        missing = []
        for topic in self.required:
            pub = self._clock_pub if topic == CLOCK_TOPIC else self._pubs[topic]
            if pub.get_subscription_count() == 0:
                missing.append(f'subscriber of {topic}')
        graph = None
        for topic in self.options.answers:
            if topic not in self._subs:
                if graph is None:
                    graph = dict(self.node.get_topic_names_and_types())
                types = graph.get(topic)
                if not types:
                    missing.append(f'publisher of {topic}')
                    continue
                self._subscribe_answer(topic, types[0])
            if self._publisher_count(topic) == 0:
                missing.append(f'publisher of {topic}')
        return missing

    def wait_for_discovery(self) -> float:
        """Spin until the required subscribers and answer publishers are matched."""
        t0 = time.monotonic()
        deadline = t0 + self.options.wait_timeout
        while True:
            missing = self._missing()
            if not missing:
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise ReplayError(f'discovery timed out after {self.options.wait_timeout:.1f} s; '
                                  f'still missing: {", ".join(missing)} (node not running, '
                                  f'another ROS_DOMAIN_ID, or incompatible QoS: the replayer '
                                  f'is reliable/volatile)')
            self.executor.spin_once(timeout_sec=0.02)

    def _spin_until(self, cond, deadline: float) -> bool:
        while not cond():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return cond()
            self.executor.spin_once(timeout_sec=min(remaining, 0.05))
        return True

    # ---------------------------------------------------------------- run
    def _publish(self, m: bag_io.BagMessage, result: ReplayResult) -> None:
        self._bag_now = m.timestamp_ns
        if self._clock_pub is not None:
            from builtin_interfaces.msg import Time
            from rosgraph_msgs.msg import Clock
            self._clock_pub.publish(Clock(clock=Time(sec=m.timestamp_ns // 1_000_000_000,
                                                     nanosec=m.timestamp_ns % 1_000_000_000)))
            result.clock_published += 1
        self._pubs[m.topic].publish(m.rawdata)
        if self._recorder is not None and self.options.record_inputs:
            with self._lock:
                self._recorder.write(m.topic, m.msgtype, m.timestamp_ns, m.rawdata)
        result.published += 1

    def run(self) -> ReplayResult:
        o = self.options
        result = ReplayResult()
        self._answers = result.answers
        self._wall0 = None
        self._t_first = 0
        self._bag_now = 0
        if self.node not in self.executor.get_nodes():
            self.executor.add_node(self.node)
        try:
            if o.record is not None:
                self._recorder = bag_io.BagRecorder(o.record, msg_files=o.msg_files,
                                                    overwrite=o.overwrite).open()
                if o.record_inputs:
                    for topic in self.topics:
                        self._recorder.add_topic(topic, self.bag_types[topic])
                result.record = Path(o.record)
            self._create_entities()
            result.discovery_s = self.wait_for_discovery()
            self._replay(result)
            return result
        except ReplayError as e:
            e.result = result
            raise
        finally:
            self._destroy_entities()
            if self._recorder is not None:
                with self._lock:
                    self._recorder.close()
                    self._recorder = None

    def _replay(self, result: ReplayResult) -> None:
        o = self.options
        triggers = set(o.triggers)
        per_topic: Counter[str] = Counter()
        expected = 0
        t_last = None
        wall0 = time.monotonic()
        for m in bag_io.read_messages(self.bag, self.topics):
            if self._wall0 is None:
                self._t_first = m.timestamp_ns
                wall0 = time.monotonic()
                self._wall0 = wall0
            t_last = m.timestamp_ns
            if o.mode == 'timed':
                due = wall0 + (m.timestamp_ns - self._t_first) / 1e9 / o.rate
                while (remaining := due - time.monotonic()) > 0:
                    self.executor.spin_once(timeout_sec=min(remaining, 0.05))
            is_trigger = m.topic in triggers
            if is_trigger:
                expected += o.answers_per_trigger
            t_pub = time.monotonic()
            self._publish(m, result)
            per_topic[m.topic] += 1
            if is_trigger:
                result.triggers += 1
            if o.mode == 'lockstep':
                if is_trigger:
                    ok = self._spin_until(lambda: self._answer_count() >= expected,
                                          time.monotonic() + o.answer_timeout)
                    if not ok:
                        result.published_per_topic = dict(per_topic)
                        raise ReplayError(
                            f'no answer within {o.answer_timeout:.1f} s to trigger '
                            f'#{result.triggers} on {m.topic} at bag time {m.timestamp_ns} '
                            f'({self._answer_count()} of {expected} answers so far)')
                    result.latencies_s.append(time.monotonic() - t_pub)
                else:
                    if self._guard is not None:
                        self._flush()
                    if o.settle > 0:
                        end = time.monotonic() + o.settle
                        while (remaining := end - time.monotonic()) > 0:
                            self.executor.spin_once(timeout_sec=remaining)
        result.published_per_topic = dict(per_topic)
        if t_last is not None:
            result.bag_duration_s = (t_last - self._t_first) / 1e9
        if o.mode == 'timed' and expected:
            ok = self._spin_until(lambda: self._answer_count() >= expected,
                                  time.monotonic() + o.answer_timeout)
            if not ok:
                raise ReplayError(f'{self._answer_count()} answers for {result.triggers} '
                                  f'triggers ({expected} expected) after {o.answer_timeout:.1f} s')
        if o.drain > 0:
            end = time.monotonic() + o.drain
            while (remaining := end - time.monotonic()) > 0:
                self.executor.spin_once(timeout_sec=min(remaining, 0.05))
        result.elapsed_s = time.monotonic() - wall0


# -------------------------------------------------------------------- CLI
def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in s.split(',') if x.strip()] if s else []


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog='capsule_replay',
        description='Replay a ROS 2 bag (read with rosbags) through rclpy, publishing /clock, '
                    'and record the answers of a node.')
    ap.add_argument('bag', help='bag directory (or .mcap / .db3 file)')
    ap.add_argument('--mode', choices=MODES, default='timed')
    ap.add_argument('--rate', type=float, default=1.0, help='timed mode speed factor')
    ap.add_argument('--triggers', default='', help='comma-separated trigger topics')
    ap.add_argument('--answers', default='', help='comma-separated answer topics')
    ap.add_argument('--answer-types', default='',
                    help='comma-separated types aligned with --answers '
                         '(e.g. capsule_ros/msg/ActionChunk); empty: taken from the graph')
    ap.add_argument('--answers-per-trigger', type=int, default=1)
    ap.add_argument('--record', default=None, help='output MCAP bag of the answers')
    ap.add_argument('--record-inputs', action='store_true',
                    help='also write the replayed messages to the output bag')
    ap.add_argument('--overwrite', action='store_true', help='replace an existing --record')
    ap.add_argument('--clock', action=argparse.BooleanOptionalAction, default=True,
                    help='publish /clock with the bag time before each message')
    ap.add_argument('--topics', default=None, help='comma-separated bag topics to publish')
    ap.add_argument('--require', default=None,
                    help='comma-separated topics that must have a subscriber before starting '
                         '(default: all published topics)')
    ap.add_argument('--wait-timeout', type=float, default=10.0, help='discovery timeout, s')
    ap.add_argument('--answer-timeout', type=float, default=10.0, help='per-answer timeout, s')
    ap.add_argument('--settle', type=float, default=0.0,
                    help='lockstep: spin this long after each non-trigger message, s '
                         '(helps a node in another process take context before the trigger)')
    ap.add_argument('--drain', type=float, default=0.0,
                    help='keep receiving answers this long after the last message, s')
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.utilities import remove_ros_args

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(remove_ros_args(['capsule_replay'] + argv)[1:])
    answers = _csv(args.answers)
    types = _csv(args.answer_types)
    if not Path(args.bag).exists():
        print(f'capsule_replay: error: no bag at {args.bag}', file=sys.stderr)
        return 1
    context = rclpy.Context()
    rclpy.init(args=['capsule_replay'] + argv, context=context)
    node = executor = None
    try:
        if types and len(types) != len(answers):
            raise ReplayError(f'{len(types)} --answer-types for {len(answers)} --answers')
        node = rclpy.create_node('capsule_replay', context=context)
        executor = SingleThreadedExecutor(context=context)
        replayer = Replayer(
            node, executor, args.bag, mode=args.mode, rate=args.rate,
            triggers=_csv(args.triggers), answers=answers,
            answer_types={a: t for a, t in zip(answers, types)} if types else None,
            answers_per_trigger=args.answers_per_trigger, record=args.record,
            record_inputs=args.record_inputs, overwrite=args.overwrite, clock=args.clock,
            topics=_csv(args.topics) if args.topics is not None else None,
            require_subscribers=_csv(args.require) if args.require is not None else None,
            wait_timeout=args.wait_timeout, answer_timeout=args.answer_timeout,
            drain=args.drain, settle=args.settle)
        r = replayer.run()
        print(f'capsule_replay: published {r.published} messages '
              f'({", ".join(f"{t} {n}" for t, n in r.published_per_topic.items())}), '
              f'{r.clock_published} clock, {r.triggers} triggers, {len(r.answers)} answers '
              f'in {r.elapsed_s:.2f} s (discovery {r.discovery_s:.2f} s)'
              + (f'; recorded to {r.record}' if r.record else ''))
        return 0
    except (ReplayError, FileExistsError, FileNotFoundError, KeyError) as e:
        print(f'capsule_replay: error: {e}', file=sys.stderr)
        return 1
    finally:
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        context.try_shutdown()


if __name__ == '__main__':
    sys.exit(main())
