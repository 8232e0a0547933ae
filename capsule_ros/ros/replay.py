"""Bag replay with rclpy: ``capsule_replay`` (there is no ``ros2 bag play`` here, see ROS_SETUP.md).

Reads a bag with rosbags (:mod:`capsule_ros.ros.bag_io`) and publishes every message's CDR
bytes unchanged (``publisher.publish(bytes(raw))``), preceded by a ``/clock`` message carrying
the bag time (so a node with ``use_sim_time`` follows the bag). What the node publishes on the
*answer* topics is received with ``raw=True`` subscriptions and optionally recorded to an MCAP
bag.

What is played, and how (as ``ros2 bag play`` does where it can):
  * each topic is offered with the QoS its recorded publishers offered (``offered_qos_profiles``
    in the bag's metadata; see :func:`bag_io.recorded_offer`): a best-effort camera bag is
    replayed best effort. ``qos='reliable'`` offers reliable/volatile on every topic instead;
  * with the node's parameters file (``params``) only the configured input topics are played by
    default; a configured topic the bag lacks is a warning, not an error;
  * topics whose message type is not installed, and topics nobody subscribes to (``/rosout``,
    ``/parameter_events``...), are skipped with a warning; topics holding a node's answers
    (``capsule_ros/msg/ActionChunk``, ``TextChunk``, ``Status``) are never replayed;
  * an unreadable bag (an unfinished recording, say) is a :class:`bag_io.BagError` naming
    ``ros2 bag reindex``.

Answers, and the truth about them
  * only ``ActionChunk`` / ``TextChunk`` messages are answers; a ``Status`` never is. Answers
    and statuses are matched to the trigger they concern by stream and header stamp (the node
    stamps both with the trigger's stamp); for other answer types (a test's echo node) each
    message counts as one answer (``answers_per_trigger`` per trigger);
  * the result says per stream how many triggers were published, answered, and left
    unanswered (with the status codes that came instead), the answers' ``seq`` gaps and
    ``dropped`` counts, and -- given the node's name -- the node's own accounting from its
    ``~/capsule`` service (``stats``, key ``accounting``), as the change over the replay;
  * ``capsule_replay`` exits 0 only when every trigger was answered (2 otherwise, 1 on errors).

Modes
  * ``timed``: the bag's relative timing, scaled by ``rate`` (2.0 = twice as fast). At the end
    it waits (up to ``answer_timeout``) until every trigger is settled, or until the node says
    nothing is pending and every answer it counted has arrived.
  * ``lockstep``: bag order as fast as possible, except that after each message on a *trigger*
    topic it waits (spinning the executor) until the trigger is *settled*: each stream it
    triggers has an answer or a status with its stamp; nothing within ``answer_timeout`` is an
    error. Recorded answers are stamped with the bag time of the trigger they answer, so two
    lockstep replays against a deterministic node record identical bags. After each other
    message the executor is spun until two waits have passed (a guard condition of the
    replayer's node fires twice), so an in-process node on the same executor has taken each
    context message before the next one is published. Across processes the node pairs context
    with a trigger by stamp itself; ``settle`` (a short spin after each context message) is a
    heuristic kept for nodes that do not.

Before publishing anything, the replayer waits (spinning, bounded by ``wait_timeout``, never a
bare sleep) until each publisher of the required topics has a matched subscriber, each answer
topic has a publisher, and the node's ``~/capsule`` service (when ``node`` is given) is there.

Library use (in-process, shared executor)::

    replayer = Replayer(node, executor, 'test/data/demo_bag', mode='lockstep',
                        params='config/default.yaml', node_name='/capsule_node',
                        record='out_bag')
    result = replayer.run()   # call from the thread that owns the executor, not a callback
    assert result.unanswered == 0
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

from capsule_ros.ros import bag_io

log = logging.getLogger('capsule_replay')

CLOCK_TOPIC = '/clock'
CLOCK_TYPE = 'rosgraph_msgs/msg/Clock'
MODES = ('lockstep', 'timed')
QOS_CHOICES = ('recorded', 'reliable')
ANSWER_TYPES = ('capsule_ros/msg/ActionChunk', 'capsule_ros/msg/TextChunk')
STATUS_TYPE = 'capsule_ros/msg/Status'
NODE_OUTPUT_TYPES = ANSWER_TYPES + (STATUS_TYPE,)
#: the node's per-stream accounting (``~/capsule`` stats, key ``accounting``); received is the sum
#: of the others
ACCOUNTING_KEYS = ('received', 'answered', 'superseded', 'overflowed', 'stale', 'rejected',
                   'failed', 'pending')
DEFAULT_NODE = '/capsule_node'


class ReplayError(RuntimeError):
    """Discovery or answer timeout, or a bad option; ``.result`` holds what was done so far."""

    def __init__(self, message: str, result: ReplayResult | None = None):
        super().__init__(message)
        self.result = result


class Answer(NamedTuple):
    topic: str
    timestamp_ns: int   # bag time: of the trigger it answers when known, else of the last message
    rawdata: bytes      # CDR bytes as published by the node


@dataclass
class ReplayOptions:
    mode: str = 'lockstep'
    rate: float = 1.0                               # timed mode speed factor
    triggers: Sequence[str] = ()                    # lockstep waits for answers after these
    answers: Sequence[str] = ()                     # topics the node answers (and reports) on
    #: types of the answer topics: a mapping topic -> 'pkg/msg/Name', or a list aligned with
    #: ``answers``; a topic left out gets its type from the ROS graph once its publisher shows up
    answer_types: Mapping[str, str] | Sequence[str] | None = None
    answers_per_trigger: int = 1                    # for triggers whose streams are unknown
    record: str | Path | None = None                # output MCAP bag (answers)
    record_inputs: bool = False                     # also record the replayed messages
    overwrite: bool = False                         # replace an existing ``record`` directory
    msg_files: Mapping[str, str | Path] | None = None  # extra .msg files for the output bag
    clock: bool = True                              # publish /clock before each message
    #: bag topics to publish; None: the configured inputs (with ``params``) or every topic
    topics: Sequence[str] | None = None
    all_topics: bool = False                        # with ``params``: every topic of the bag
    #: topics whose publisher must have a matched subscriber before starting (None: the
    #: configured inputs with ``params``, else the triggers, else every topic); other topics
    #: nobody subscribes to are skipped. '/clock' may be listed too
    require_subscribers: Sequence[str] | None = None
    #: the node's parameters file: its inputs (what to play), triggers and streams
    params: str | Path | None = None
    #: the node's fully qualified name: its ~/actions, ~/text, ~/status are the default answers
    #: and its ~/capsule service gives the accounting (default /capsule_node with ``params``)
    node_name: str | None = None
    accounting: bool = True                         # ask the node for its accounting
    qos: str = 'recorded'                           # 'recorded' (as ros2 bag play) | 'reliable'
    wait_timeout: float = 10.0                      # discovery, seconds
    answer_timeout: float = 10.0                    # per trigger (lockstep) / at the end (timed)
    drain: float = 0.0                              # spin this long after the last message
    depth: int = 1000                               # publisher / subscription history depth
    ack_timeout: float = 0.3                        # at the end: wait for acks, all pubs, s
    flush: bool = True                              # lockstep: let the executor take each message
    #: lockstep: also spin this long after each non-trigger message -- a heuristic for nodes in
    #: another process that do not pair context with a trigger by stamp
    settle: float = 0.0
    #: lockstep, before the node's first answer, with its accounting: a trigger still unsettled
    #: after ``resend_after`` s that the node says it never received is published again, up to
    #: ``startup_resends`` times (see ``Replayer._await_settled``)
    resend_after: float = 1.0
    startup_resends: int = 3


@dataclass
class StreamReport:
    """What one stream got during a replay, from the replayer's side."""

    triggers: int = 0           # trigger messages published for it
    answered: int = 0           # of those, answered (an ActionChunk/TextChunk with its stamp)
    unanswered: int = 0
    statuses: Counter = field(default_factory=Counter)   # code -> count, about its triggers
    answers: int = 0            # answers received on it (also ones matching no trigger)
    seq_gaps: int = 0           # breaks in the answers' seq (1, 2, 3...)
    dropped: int = 0            # sum of the answers' ``dropped``


@dataclass
class ReplayResult:
    published: int = 0                              # bag messages published (no /clock)
    published_per_topic: dict[str, int] = field(default_factory=dict)
    clock_published: int = 0
    triggers: int = 0                               # trigger messages published
    #: every message received on the answer topics, statuses included (see ``answer_count``)
    answers: list[Answer] = field(default_factory=list)
    answer_count: int = 0                           # answers only: never a Status
    status_count: int = 0
    unanswered: int = 0                             # triggers with no answer
    resent: int = 0                                 # lockstep: triggers published again at start
    streams: dict[str, StreamReport] = field(default_factory=dict)
    #: the node's own accounting over the replay: {stream: {key: change}} (``pending``: at the
    #: end); None when not available -- ``accounting_note`` says why
    accounting: dict[str, dict[str, int]] | None = None
    accounting_note: str = ''
    skipped: dict[str, str] = field(default_factory=dict)   # topic -> why it was not played
    warnings: list[str] = field(default_factory=list)
    offered_qos: dict[str, str] = field(default_factory=dict)  # topic -> what was offered
    latencies_s: list[float] = field(default_factory=list)  # lockstep: trigger -> settled
    #: timed mode: per published message, how late it went out against its scaled bag time
    #: (never negative: a message is never sent early)
    lateness_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0                          # from first publish to the end
    discovery_s: float = 0.0
    bag_duration_s: float = 0.0                     # span of the published messages
    record: Path | None = None

    @property
    def ok(self) -> bool:
        """Every trigger answered."""
        return self.unanswered == 0

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


def resolve_topic(topic: str, node_name: str) -> str:
    """A topic name from the node's parameters as the node resolves it (relative names in the
    node's namespace, ``~/x`` under the node)."""
    if topic.startswith('/'):
        return topic
    if topic.startswith('~/'):
        return f'{node_name}/{topic[2:]}'
    namespace = node_name.rsplit('/', 1)[0]
    return f'{namespace}/{topic}'


def _stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _header_stamp(m: bag_io.BagMessage) -> int | None:
    header = getattr(m.msg, 'header', None)
    return None if header is None else _stamp_ns(header.stamp)


class _Trigger(NamedTuple):
    topic: str
    bag_ns: int
    stamp: int | None             # header stamp; None for headerless types
    streams: tuple[str, ...]      # streams it triggers; () when unknown (no params)


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
        if o.qos not in QOS_CHOICES:
            raise ReplayError(f'qos must be one of {QOS_CHOICES}, got {o.qos!r}')
        if o.rate <= 0:
            raise ReplayError(f'rate must be > 0, got {o.rate}')
        if o.resend_after <= 0 or o.startup_resends < 0:
            raise ReplayError(f'resend_after must be > 0 and startup_resends >= 0, got '
                              f'{o.resend_after} and {o.startup_resends}')
        self.node = node
        if executor is None:
            from rclpy.executors import SingleThreadedExecutor
            executor = SingleThreadedExecutor(context=node.context)
        self.executor = executor
        self.bag = Path(bag)
        self.info = bag_io.bag_info(self.bag)          # BagError for unreadable bags
        self.bag_types = {t: i.msgtype for t, i in self.info.items()}
        self.skipped: dict[str, str] = {}
        self.warnings: list[str] = []
        self.config = None
        if o.params is not None:
            from capsule_ros.config import load_yaml
            self.config = load_yaml(o.params)
        self.node_name = o.node_name or (DEFAULT_NODE if self.config is not None else None)
        answers = list(o.answers)
        types = _normalize_answer_types(answers, o.answer_types)
        if not answers and self.node_name:
            answers = [f'{self.node_name}/{x}' for x in ('actions', 'text', 'status')]
            types = dict(zip(answers, ANSWER_TYPES + (STATUS_TYPE,)))
        self.answer_topics = answers
        self.answer_types = types
        self.trigger_streams = self._trigger_streams()
        self.triggers = self._select_triggers()
        self.topics = self._select_topics()
        bad = [t for t in self.triggers if t not in self.topics]
        if bad:
            if o.triggers:
                why = [f"{t} ({self.skipped.get(t, 'not in the bag')})" for t in bad]
                raise ReplayError(f'trigger topics not replayed from the bag: {why}')
            self.triggers = [t for t in self.triggers if t in self.topics]
        if o.require_subscribers is not None:
            self.required = list(o.require_subscribers)
        elif self.config is not None:
            self.required = [t for t in self._configured_topics() if t in self.topics]
        elif self.triggers:
            self.required = list(self.triggers)
        else:
            self.required = list(self.topics)
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
        self._client = None
        self._wall0: float | None = None
        self._t_first = 0
        self._guard = None
        self._guard_fired = 0
        self._reset_tallies()

    # ---------------------------------------------------------------- what is played
    def _configured_topics(self) -> list[str]:
        assert self.config is not None
        return [resolve_topic(spec.topic, self.node_name or DEFAULT_NODE)
                for spec in self.config.inputs.values()]

    def _trigger_streams(self) -> dict[str, tuple[str, ...]]:
        """{trigger topic: streams it triggers}, from the node's parameters."""
        if self.config is None:
            return {}
        out: dict[str, list[str]] = defaultdict(list)
        for s in self.config.streams.values():
            if s.trigger:
                spec = self.config.inputs[s.trigger]
                out[resolve_topic(spec.topic, self.node_name or DEFAULT_NODE)].append(s.name)
        return {t: tuple(v) for t, v in out.items()}

    def _select_triggers(self) -> list[str]:
        if self.options.triggers:
            return list(self.options.triggers)
        return sorted(self.trigger_streams)

    def _skip(self, topic: str, why: str) -> None:
        self.skipped[topic] = why
        self.warnings.append(f'{topic}: skipped, {why}')
        log.warning('%s: skipped, %s', topic, why)

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        log.warning('%s', text)

    def _select_topics(self) -> list[str]:
        o = self.options
        if o.topics is not None:
            candidates = list(o.topics)
            missing = [t for t in candidates if t not in self.info]
            if missing:
                raise ReplayError(f'topics not in bag {self.bag}: {missing}')
        elif self.config is not None and not o.all_topics:
            candidates = []
            for name, spec in self.config.inputs.items():
                topic = resolve_topic(spec.topic, self.node_name or DEFAULT_NODE)
                if topic in self.info:
                    candidates.append(topic)
                else:
                    streams = [s.name for s in self.config.streams.values()
                               if s.trigger == name or name in s.context]
                    self._warn(f'the bag has no {topic} (input {name!r}): replayed without it; '
                               f'streams {streams} get none of its messages')
            not_played = [t for t in self.info if t not in candidates]
            if not_played:
                log.info('not played (not a configured input; --all-topics plays them): %s',
                         ', '.join(not_played))
        else:
            candidates = list(self.info)
        topics = []
        for topic in candidates:
            msgtype = self.bag_types[topic]
            if msgtype in NODE_OUTPUT_TYPES or topic in self.answer_topics:
                # a node's earlier answers: republishing them would count as answers
                self._skip(topic, f'it holds a node\'s answers ({msgtype}), never replayed')
                continue
            if topic == CLOCK_TOPIC and o.clock:
                continue   # the replayer publishes its own /clock
            try:
                import_msg_class(msgtype)
            except (ReplayError, ValueError):
                self._skip(topic, f'its type {msgtype} is not installed')
                continue
            topics.append(topic)
        if not topics:
            raise ReplayError(f'nothing to replay from {self.bag}: '
                              + '; '.join(f'{t}: {w}' for t, w in self.skipped.items())
                              if self.skipped else f'nothing to replay from {self.bag}')
        return topics

    # ---------------------------------------------------------------- entities
    def _reliable_qos(self):
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.options.depth,
                          reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)

    def _offer(self, topic: str, result: ReplayResult):
        """The publisher QoS of ``topic``: the recorded offer, or reliable (``qos='reliable'``)."""
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        if self.options.qos == 'reliable':
            result.offered_qos[topic] = 'reliable, volatile'
            return self._reliable_qos()
        offer = bag_io.recorded_offer(self.info[topic])
        if offer.note and self.info[topic].offered_qos:
            self._warn(f'{topic}: {offer.note}')
        result.offered_qos[topic] = f'{offer.reliability}, {offer.durability}'
        return QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=self.options.depth,
            reliability=(ReliabilityPolicy.BEST_EFFORT if offer.reliability == 'best_effort'
                         else ReliabilityPolicy.RELIABLE),
            durability=(DurabilityPolicy.TRANSIENT_LOCAL if offer.durability == 'transient_local'
                        else DurabilityPolicy.VOLATILE))

    def _create_entities(self, result: ReplayResult) -> None:
        for topic in self.topics:
            cls = import_msg_class(self.bag_types[topic])
            self._pubs[topic] = self.node.create_publisher(cls, topic, self._offer(topic, result))
        if self.options.clock:
            from rosgraph_msgs.msg import Clock
            self._clock_pub = self.node.create_publisher(Clock, CLOCK_TOPIC, self._reliable_qos())
        for topic in self.answer_topics:
            if topic in self.answer_types:
                self._subscribe_answer(topic, self.answer_types[topic])
        if self.node_name and self.options.accounting:
            from capsule_ros.srv import CapsuleOp
            self._client = self.node.create_client(CapsuleOp, f'{self.node_name}/capsule')
        if self.options.mode == 'lockstep' and self.options.flush:
            self._guard = self.node.create_guard_condition(self._on_guard)

    def _subscribe_answer(self, topic: str, msgtype: str) -> None:
        cls = import_msg_class(msgtype)
        self.answer_types[topic] = msgtype

        def callback(raw: bytes, topic: str = topic) -> None:
            self._on_answer(topic, raw)

        self._subs[topic] = self.node.create_subscription(cls, topic, callback,
                                                          self._reliable_qos(), raw=True)
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
        if self._client is not None:
            self.node.destroy_client(self._client)
            self._client = None
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

    # ---------------------------------------------------------------- answers
    def _reset_tallies(self) -> None:
        self._need: Counter = Counter()        # (stream, stamp) -> triggers published
        self._need_any: Counter = Counter()    # stamp -> triggers of unknown streams (x per)
        self._ans: Counter = Counter()         # (stream, stamp) -> answers
        self._ans_any: Counter = Counter()     # stamp -> answers, any stream
        self._st: Counter = Counter()          # (stream, stamp) -> statuses ('' = no stream)
        self._st_any: Counter = Counter()      # stamp -> statuses, any stream
        self._st_codes: dict[tuple[str, int], Counter] = defaultdict(Counter)
        self._generic = 0                      # messages on answer topics of other types
        self._capsule_answers = 0
        self._statuses = 0
        self._seq: dict[str, list[int]] = defaultdict(list)
        self._dropped: Counter = Counter()
        self._bag_time_of: dict[int, int] = {}  # trigger header stamp -> its bag time
        self._all_triggers: list[_Trigger] = []
        self._expected_generic = 0              # answers_per_trigger x triggers
        self._headerless = 0                    # triggers without a header
        self._published_per_topic: Counter[str] = Counter()

    def _kind(self, topic: str) -> str:
        msgtype = self.answer_types.get(topic, '')
        if msgtype in ANSWER_TYPES:
            return 'answer'
        return 'status' if msgtype == STATUS_TYPE else 'generic'

    def _on_answer(self, topic: str, raw: bytes) -> None:
        kind = self._kind(topic)
        stamp = None
        if kind != 'generic':
            from rclpy.serialization import deserialize_message
            msg = deserialize_message(bytes(raw), import_msg_class(self.answer_types[topic]))
            stamp = _stamp_ns(msg.header.stamp)
        with self._lock:
            if kind == 'answer':
                self._capsule_answers += 1
                self._ans[(msg.stream, stamp)] += 1
                self._ans_any[stamp] += 1
                self._seq[msg.stream].append(int(msg.seq))
                self._dropped[msg.stream] += int(msg.dropped)
            elif kind == 'status':
                self._statuses += 1
                self._st[(msg.stream, stamp)] += 1
                self._st_any[stamp] += 1
                self._st_codes[(msg.stream, stamp)][int(msg.code)] += 1
            else:
                self._generic += 1
            if stamp is not None and stamp in self._bag_time_of:
                bag_ns = self._bag_time_of[stamp]      # deterministic: the trigger's bag time
            elif self.options.mode == 'timed' and self._wall0 is not None:
                est = self._t_first + int((time.monotonic() - self._wall0)
                                          * self.options.rate * 1e9)
                bag_ns = max(self._bag_now, est)
            else:
                bag_ns = self._bag_now
            answer = Answer(topic, bag_ns, bytes(raw))
            self._answers.append(answer)
            if self._recorder is not None:
                self._recorder.write(topic, self.answer_types[topic], bag_ns, answer.rawdata)

    def _matched(self) -> bool:
        """Answers are matched to triggers by stream and stamp (capsule answer types)."""
        return any(self._kind(t) != 'generic' for t in self.answer_topics
                   if t in self.answer_types)

    def _settled(self, t: _Trigger, expected_generic: int) -> bool:
        """Each stream the trigger concerns has an answer or a status with its stamp (for answer
        types that carry no stream: enough messages)."""
        with self._lock:
            if not self._matched():
                return self._generic >= expected_generic
            if t.stamp is None:   # headerless trigger: the node stamps with its receive time
                return (self._capsule_answers + self._statuses + self._generic
                        >= expected_generic)
            if not t.streams:
                k = self.options.answers_per_trigger
                return self._ans_any[t.stamp] + self._st_any[t.stamp] >= self._need_any[t.stamp] * k
            return all(self._ans[(s, t.stamp)] + self._st[(s, t.stamp)] + self._st[('', t.stamp)]
                       >= self._need[(s, t.stamp)] for s in t.streams)

    def _unanswered(self) -> int:
        with self._lock:
            if not self._matched():
                return max(0, self._expected_generic - self._generic)
            k = self.options.answers_per_trigger
            matched = sum(min(need, self._ans[key]) for key, need in self._need.items())
            matched_any = sum(min(need * k, self._ans_any[stamp])
                              for stamp, need in self._need_any.items())
            missing = (sum(self._need.values()) - matched
                       + sum(self._need_any.values()) * k - matched_any)
            if self._headerless:   # no stamp to match: the answers left over
                spare = self._capsule_answers - matched - matched_any
                missing += max(0, self._headerless * k - spare)
            return missing

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
        for topic in self.answer_topics:
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
        if self._client is not None and not self._client.service_is_ready():
            missing.append(f'service {self._client.srv_name}')
        return missing

    def _unmatched_optional(self) -> list[str]:
        """Optional topics someone subscribes to (in the graph) but not yet matched with us."""
        waiting = []
        for topic in self.topics:
            if topic in self.required or topic not in self._pubs:
                continue
            if self._pubs[topic].get_subscription_count() == 0 and \
                    self.node.count_subscribers(topic) > 0:
                waiting.append(topic)
        return waiting

    def wait_for_discovery(self) -> float:
        """Spin until the required subscribers, answer publishers and the node's service are
        there; then skip the other topics nobody subscribes to."""
        t0 = time.monotonic()
        deadline = t0 + self.options.wait_timeout
        while True:
            missing = self._missing()
            waiting = self._unmatched_optional() if not missing else []
            if not missing and not waiting:
                break
            if time.monotonic() > deadline:
                if missing:
                    raise ReplayError(
                        f'discovery timed out after {self.options.wait_timeout:.1f} s; still '
                        f'missing: {", ".join(missing)} (node not running, another '
                        f'ROS_DOMAIN_ID, or incompatible QoS: see the offered QoS per topic, '
                        f'--qos reliable offers reliable/volatile)')
                for topic in waiting:
                    self._skip(topic, 'its subscribers never matched the recorded QoS offer '
                                      '(a reliable subscriber and a best-effort bag?)')
                break
            self.executor.spin_once(timeout_sec=0.02)
        for topic in list(self.topics):
            if topic in self.required or topic in self.skipped:
                continue
            if self._pubs[topic].get_subscription_count() == 0:
                self._skip(topic, 'nobody subscribes to it')
        self.topics = [t for t in self.topics if t not in self.skipped]
        return time.monotonic() - t0

    def _spin_until(self, cond: Callable[[], bool], deadline: float) -> bool:
        while not cond():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return cond()
            self.executor.spin_once(timeout_sec=min(remaining, 0.05))
        return True

    # ---------------------------------------------------------------- accounting
    def _stats(self, timeout: float) -> dict | None:
        """The node's ``~/capsule`` stats JSON, or None (no node, no answer)."""
        if self._client is None:
            return None
        from capsule_ros.srv import CapsuleOp
        future = self._client.call_async(CapsuleOp.Request(op='stats'))
        if not self._spin_until(future.done, time.monotonic() + timeout):
            self._client.remove_pending_request(future)
            return None
        response = future.result()
        if response is None or not response.ok:
            return None
        try:
            return json.loads(response.json or '{}')
        except ValueError:
            return None

    @staticmethod
    def _accounting_of(stats: dict | None) -> dict[str, dict[str, int]] | None:
        acc = None if stats is None else stats.get('accounting')
        if not isinstance(acc, Mapping):
            return None
        return {str(s): {k: int(v.get(k, 0)) for k in ACCOUNTING_KEYS}
                for s, v in acc.items() if isinstance(v, Mapping)}

    def _accounting_delta(self, before: dict, after: dict) -> dict[str, dict[str, int]]:
        out = {}
        for stream, now in after.items():
            prev = before.get(stream, {})
            row = {k: now[k] - prev.get(k, 0) for k in ACCOUNTING_KEYS if k != 'pending'}
            row['pending'] = now['pending']          # a level, not a count
            out[stream] = row
        return out

    def _caught_up(self, baseline: dict) -> bool:
        """The node has nothing pending, has received every trigger published for its streams
        (or every one of them is settled here), and every answer it counted since the start
        has arrived here."""
        acc = self._accounting_of(self._stats(timeout=min(5.0, self.options.answer_timeout)))
        if acc is None or any(v['pending'] for v in acc.values()):
            return False
        delta = self._accounting_delta(baseline, acc)
        with self._lock:
            got = Counter(s for s, _ in self._ans.elements())
            published = Counter()
            for (s, _), n in self._need.items():
                published[s] += n
        if not all(got[s] >= row['answered'] for s, row in delta.items()):
            return False
        # a trigger still on its way would be counted later: wait for it (lost ones: timeout)
        expected = self._expected_generic
        return (all(delta.get(s, {}).get('received', 0) >= n for s, n in published.items())
                or all(self._settled(t, expected) for t in self._all_triggers))

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
        self._reset_tallies()
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
            self._create_entities(result)
            result.discovery_s = self.wait_for_discovery()
            baseline = None
            if self._client is not None:
                stats = self._stats(timeout=o.wait_timeout)
                baseline = self._accounting_of(stats)
                if stats is None:
                    result.accounting_note = f'{self._client.srv_name} did not answer stats'
                elif baseline is None:
                    result.accounting_note = ('the node reports no accounting (an older node: '
                                              'no "accounting" key in ~/capsule stats)')
            else:
                result.accounting_note = ('no node name given (--node): the node\'s accounting '
                                          'was not asked for')
            self._replay(result, baseline)
            return result
        except ReplayError as e:
            self._finish(result)
            e.result = result
            raise
        finally:
            self._destroy_entities()
            if self._recorder is not None:
                with self._lock:
                    self._recorder.close()
                    self._recorder = None

    def _replay(self, result: ReplayResult, baseline: dict | None) -> None:
        o = self.options
        triggers = set(self.triggers)
        t_last = None
        wall0 = time.monotonic()
        per_topic = self._published_per_topic
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
                result.lateness_s.append(time.monotonic() - due)
            trig = None
            if m.topic in triggers:
                trig = _Trigger(m.topic, m.timestamp_ns, _header_stamp(m),
                                self.trigger_streams.get(m.topic, ()))
                self._expect(trig)
            t_pub = time.monotonic()
            self._publish(m, result)
            per_topic[m.topic] += 1
            if trig is not None:
                result.triggers += 1
            if o.mode == 'lockstep':
                if trig is not None:
                    ok = self._await_settled(trig, m, result, baseline)
                    if not ok:
                        self._finish(result)
                        raise ReplayError(
                            f'no answer within {o.answer_timeout:.1f} s to trigger '
                            f'#{result.triggers} on {m.topic} at bag time {m.timestamp_ns} '
                            f'({result.answer_count} answers, {result.status_count} statuses '
                            f'so far)')
                    result.latencies_s.append(time.monotonic() - t_pub)
                else:
                    if self._guard is not None:
                        self._flush()
                    if o.settle > 0:
                        end = time.monotonic() + o.settle
                        while (remaining := end - time.monotonic()) > 0:
                            self.executor.spin_once(timeout_sec=remaining)
        if t_last is not None:
            result.bag_duration_s = (t_last - self._t_first) / 1e9
        # the end: the node says all it counted has arrived here (or, not asked: every trigger
        # settled -- timed mode; lockstep settled each one already)
        deadline = time.monotonic() + o.answer_timeout
        expected = self._expected_generic
        if baseline is not None:
            next_poll = 0.0
            caught = [False]

            def caught_up() -> bool:
                nonlocal next_poll
                if time.monotonic() >= next_poll:
                    caught[0] = self._caught_up(baseline)
                    next_poll = time.monotonic() + 0.1
                return caught[0]
            self._spin_until(caught_up, deadline)
            result.accounting = self._accounting_delta(
                baseline, self._accounting_of(self._stats(timeout=5.0)) or {})
        elif o.mode == 'timed':
            self._spin_until(lambda: all(self._settled(t, expected) for t in self._all_triggers),
                             deadline)
        if o.drain > 0:
            end = time.monotonic() + o.drain
            while (remaining := end - time.monotonic()) > 0:
                self.executor.spin_once(timeout_sec=min(remaining, 0.05))
        result.elapsed_s = time.monotonic() - wall0
        self._finish(result)

    def _await_settled(self, trig: _Trigger, m: bag_io.BagMessage, result: ReplayResult,
                       baseline: dict | None) -> bool:
        """Lockstep: spin until ``trig`` is answered, up to ``answer_timeout``.

        Before anything has come back from the node, a trigger can be lost on the way: DDS
        matches the two ends of a new connection one side at a time, so our publisher can see
        the node's subscription before the node's reader knows our writer, and a best-effort
        reader drops what arrives from a writer it does not know yet. So, at the start only,
        and only when the node's accounting says it received nothing since the replay began,
        the trigger is published again (``resend_after``, at most ``startup_resends`` times).
        Without the accounting we cannot tell a lost trigger from a slow answer, and resend
        nothing: a duplicate would be a second query."""
        o = self.options
        expected = self._expected_generic
        deadline = time.monotonic() + o.answer_timeout
        resends = 0
        while True:
            startup = baseline is not None and resends < o.startup_resends and not self._heard_back()
            wait_until = min(deadline, time.monotonic() + o.resend_after) if startup else deadline
            if self._spin_until(lambda: self._settled(trig, expected), wait_until):
                return True
            if time.monotonic() >= deadline:
                return False
            acc = self._accounting_of(self._stats(timeout=min(5.0, o.answer_timeout)))
            if acc is None:                   # no word from the node: nothing to go on
                resends = o.startup_resends
                continue
            received = sum(row['received'] for row in self._accounting_delta(baseline, acc).values())
            if received > 0:
                resends = o.startup_resends   # it arrived: the answer is only slow
                continue
            self._pubs[m.topic].publish(m.rawdata)
            resends += 1
            result.resent += 1
            self.warnings.append(f'trigger #{result.triggers} on {m.topic} was published again '
                                 f'after {o.resend_after:.1f} s: the node had received nothing '
                                 '(lost while the DDS match was still forming)')

    def _heard_back(self) -> bool:
        """Anything (an answer or a status) has come back from the node."""
        with self._lock:
            return bool(self._capsule_answers or self._statuses or self._generic)

    def _expect(self, t: _Trigger) -> None:
        with self._lock:
            self._all_triggers.append(t)
            self._expected_generic += self.options.answers_per_trigger
            if t.stamp is None:
                self._headerless += 1
                return
            self._bag_time_of.setdefault(t.stamp, t.bag_ns)
            if t.streams:
                for s in t.streams:
                    self._need[(s, t.stamp)] += 1
            else:
                self._need_any[t.stamp] += 1

    def _finish(self, result: ReplayResult) -> None:
        """Fill the result's tallies from what arrived so far."""
        result.published_per_topic = dict(self._published_per_topic)
        result.skipped = dict(self.skipped)
        result.warnings = list(self.warnings)
        with self._lock:
            result.answer_count = self._capsule_answers + self._generic
            result.status_count = self._statuses
            streams: dict[str, StreamReport] = defaultdict(StreamReport)
            for (s, stamp), need in self._need.items():
                r = streams[s]
                r.triggers += need
                r.answered += min(need, self._ans[(s, stamp)])
                r.statuses.update(self._st_codes.get((s, stamp), Counter()))
                r.statuses.update(self._st_codes.get(('', stamp), Counter()))
            for s, seqs in self._seq.items():
                r = streams[s]
                r.answers = len(seqs)
                r.seq_gaps = sum(1 for a, b in zip(seqs, seqs[1:]) if b != a + 1)
                r.dropped = self._dropped[s]
            for r in streams.values():
                r.unanswered = r.triggers - r.answered
        result.streams = dict(streams)
        result.unanswered = self._unanswered()


# -------------------------------------------------------------------- report
def format_report(r: ReplayResult) -> str:
    """The human-readable summary ``capsule_replay`` prints."""
    lines = [f'published {r.published} messages '
             f'({", ".join(f"{t} {n}" for t, n in r.published_per_topic.items()) or "none"}), '
             f'{r.clock_published} clock, {r.triggers} triggers, {r.answer_count} answers, '
             f'{r.status_count} statuses in {r.elapsed_s:.2f} s '
             f'(discovery {r.discovery_s:.2f} s)']
    for topic, qos in r.offered_qos.items():
        if topic in r.published_per_topic:
            lines.append(f'  offered {topic}: {qos}')
    for topic, why in r.skipped.items():
        lines.append(f'  skipped {topic}: {why}')
    for w in r.warnings:
        if not any(w.startswith(f'{t}: skipped') for t in r.skipped):
            lines.append(f'  warning: {w}')
    for name, s in sorted(r.streams.items()):
        codes = ', '.join(f'{c} x{n}' for c, n in sorted(s.statuses.items())) or 'none'
        lines.append(f'  stream {name}: {s.triggers} triggers, {s.answered} answered, '
                     f'{s.unanswered} unanswered; statuses {codes}; {s.answers} answers '
                     f'received (seq gaps {s.seq_gaps}, dropped reported {s.dropped})')
    if r.accounting is not None:
        for name, row in sorted(r.accounting.items()):
            parts = ', '.join(f'{k} {row[k]}' for k in ACCOUNTING_KEYS)
            balanced = row['received'] == sum(row[k] for k in ACCOUNTING_KEYS[1:])
            lines.append(f'  node accounting {name}: {parts}'
                         + ('' if balanced else '  (does not add up)'))
    else:
        lines.append(f'  node accounting: {r.accounting_note or "not available"}')
    lines.append(f'{r.unanswered} triggers unanswered' if r.unanswered
                 else 'every trigger answered')
    if r.record:
        lines.append(f'recorded to {r.record}')
    return '\n'.join(lines)


# -------------------------------------------------------------------- CLI
def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in s.split(',') if x.strip()] if s else []


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog='capsule_replay',
        description='Replay a ROS 2 bag (read with rosbags) through rclpy, publishing /clock, '
                    'and record the answers of a node. Exit status: 0 every trigger answered, '
                    '2 some trigger unanswered, 1 an error.')
    ap.add_argument('bag', help='bag directory (or .mcap file)')
    ap.add_argument('--mode', choices=MODES, default='timed')
    ap.add_argument('--rate', type=float, default=1.0, help='timed mode speed factor')
    ap.add_argument('--params', default=None,
                    help="the node's parameters file: play its input topics, wait on its "
                         "triggers, match answers to its streams")
    ap.add_argument('--node', default=None,
                    help='the node\'s fully qualified name (default /capsule_node with '
                         '--params): answers on <node>/actions|text|status, accounting from '
                         '<node>/capsule')
    ap.add_argument('--qos', choices=QOS_CHOICES, default='recorded',
                    help='publisher QoS: as recorded in the bag (like ros2 bag play), or '
                         'reliable/volatile for every topic')
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
    ap.add_argument('--all-topics', action='store_true',
                    help='with --params: every topic of the bag, not only the inputs')
    ap.add_argument('--require', default=None,
                    help='comma-separated topics that must have a subscriber before starting')
    ap.add_argument('--wait-timeout', type=float, default=10.0, help='discovery timeout, s')
    ap.add_argument('--answer-timeout', type=float, default=10.0, help='per-answer timeout, s')
    ap.add_argument('--no-accounting', action='store_true',
                    help="do not ask the node's ~/capsule service for its accounting")
    ap.add_argument('--settle', type=float, default=0.0,
                    help='lockstep: spin this long after each non-trigger message, s '
                         '(a heuristic for nodes that do not pair context by stamp)')
    ap.add_argument('--drain', type=float, default=0.0,
                    help='keep receiving answers this long after the last message, s')
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.utilities import remove_ros_args

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(remove_ros_args(['capsule_replay'] + argv)[1:])
    logging.basicConfig(level=logging.WARNING, format='capsule_replay: %(levelname)s: %(message)s')
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
            all_topics=args.all_topics, params=args.params, node_name=args.node,
            accounting=not args.no_accounting, qos=args.qos,
            require_subscribers=_csv(args.require) if args.require is not None else None,
            wait_timeout=args.wait_timeout, answer_timeout=args.answer_timeout,
            drain=args.drain, settle=args.settle)
        r = replayer.run()
        print('capsule_replay: ' + format_report(r))
        return 0 if r.ok else 2
    except ReplayError as e:
        if e.result is not None:
            print('capsule_replay: ' + format_report(e.result), file=sys.stderr)
        print(f'capsule_replay: error: {e}', file=sys.stderr)
        return 1
    except (bag_io.BagError, FileExistsError, FileNotFoundError, KeyError) as e:
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
