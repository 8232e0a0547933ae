"""Where a query is scheduled: per-stream queues, one worker, exact accounting.

Callbacks only hand on: a trigger becomes a ``Job`` in its stream's queue and the callback
returns. One worker (a thread in the node; the caller itself offline) takes jobs stream by stream
in turn (fair), each stream's own jobs strictly in order, and runs each through the pipeline's
query path inside an error boundary: whatever a query raises, the stream keeps its previous
boundary, a coded ``INTERNAL`` status goes out and the next job runs.

A stream's queue has a policy: ``latest`` (a newer trigger supersedes one still waiting: a robot
wants the freshest observation) or ``fifo`` with a bound (the oldest waiting trigger overflows).
A trigger older than the stream's ``max_age_ms`` by the node's clock (sim time in replays) when
its turn comes is dropped as stale. Capsule verbs that change state run on this same worker
between queries (``call``), so a commit never overwrites a rollback.

Accounting per stream, always exact:
    received = answered + superseded + overflowed + stale + rejected + failed + pending

``gate`` tells the background writers (persistence, tier files) when the worker has a job or an
operation in hand or waiting (busy) and when it has none (quiet): they write in slices between
queries, not during them (``capsule.quiet``).
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..capsule.quiet import QuietGate
from ..status_codes import Code
from .outcome import Answer, Failure, Outcome, Publish

log = logging.getLogger("capsule_ros")

OUTCOMES = ("answered", "superseded", "overflowed", "stale", "rejected", "failed")
DROPS = ("superseded", "overflowed", "stale")
# Codes that mean "the input was wrong" (rejected) rather than "the query could not finish".
REJECTED_CODES = frozenset({Code.BAD_ENCODING, Code.BAD_SIZE, Code.NON_FINITE, Code.MISSING_JOINT,
                            Code.BAD_INPUT, Code.UNKNOWN_STREAM, Code.NO_OBSERVATION})


@dataclass
class Job:
    """One trigger message, or one explicit query, waiting for its stream's turn."""

    stream: str
    stamp_ns: int                # header stamp, or receive time (flagged)
    stamp_is_receive_time: bool
    input: str = ""              # the trigger input; for a query, an input to append ("" none)
    embeds: Any = None           # the trigger message, encoded or ``pipeline.Deferred`` (None: a query)
    encode_ms: float = 0.0
    request_id: int = 0          # a query's own id (0: numbered when accepted)
    instruction: str = ""        # a query's text
    explicit: bool = False       # from ~/query (a dropped one gets a status with its id)
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class StreamPolicy:
    queue: str = "latest"        # latest | fifo
    depth: int = 8               # fifo bound
    max_age_ms: float = 0.0      # 0 = no age limit


@dataclass
class _Stream:
    policy: StreamPolicy
    queue: deque = field(default_factory=deque)
    counts: dict = field(default_factory=lambda: {k: 0 for k in ("received",) + OUTCOMES})
    in_flight: int = 0
    dropped_since_answer: int = 0
    answers: int = 0


class Scheduler:
    """Queues, the worker loop and the accounting. ``run(job, dropped) -> outcomes`` is the
    pipeline's query path; ``ready(job)`` says whether a job's context can be paired yet;
    ``now_ns()`` is the node's clock (for max_age)."""

    def __init__(self, run: Callable[[Job, int, int], list[Outcome]], publish: Publish,
                 now_ns: Callable[[], int], ready: Callable[[Job], bool] = lambda job: True,
                 context_wait_s: float = 0.1,
                 idle: Callable[[], list[Outcome] | None] = lambda: None) -> None:
        """``idle()``: one slice of background work (a verification chunk, a compaction), run
        only when no job is ready; returns what to publish, or None when it had nothing to do."""
        self._run, self._publish, self._now_ns, self._ready = run, publish, now_ns, ready
        self._idle = idle
        self._idle_more = True
        self.context_wait_s = context_wait_s
        self._streams: dict[str, _Stream] = {}
        self._order: list[str] = []          # round-robin order
        self._next = 0
        self._ops: deque = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._busy = False
        self.gate = QuietGate()

    # -- the stream registry ------------------------------------------------------------------
    def add_stream(self, name: str, policy: StreamPolicy) -> None:
        with self._cond:
            if name not in self._streams:
                self._streams[name] = _Stream(policy)
                self._order.append(name)

    def drop_stream(self, name: str) -> None:
        with self._cond:
            if self._streams.pop(name, None) is not None:
                self._order.remove(name)

    def has_stream(self, name: str) -> bool:
        with self._cond:
            return name in self._streams

    # -- handing on (callbacks) -----------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job`` under its stream's policy; what it displaces is accounted at once.
        A stream's jobs wait in stamp order (callbacks on several executor threads may hand on
        out of order): ``latest`` keeps only the newest stamp, ``fifo`` drops the oldest."""
        with self._cond:
            s = self._streams[job.stream]
            s.counts["received"] += 1
            displaced: list[tuple[Job, str]] = []
            if s.policy.queue == "latest":
                if any(old.stamp_ns > job.stamp_ns for old in s.queue):
                    displaced = [(job, "superseded")]   # a newer one already waits
                else:
                    displaced = [(old, "superseded") for old in s.queue]
                    s.queue.clear()
                    s.queue.append(job)
            else:
                at = next((i for i, old in enumerate(s.queue) if old.stamp_ns > job.stamp_ns),
                          len(s.queue))
                s.queue.insert(at, job)
                if len(s.queue) > s.policy.depth:
                    displaced = [(s.queue.popleft(), "overflowed")]
            for old, why in displaced:
                self._count_drop(s, why)
            if self._thread is not None:
                self.gate.busy()
            self._cond.notify_all()
        for old, why in displaced:
            self._tell_dropped(old, why)

    def wake(self) -> None:
        """New context arrived: a job waiting for it may be ready now."""
        with self._cond:
            self._cond.notify_all()

    def call(self, fn: Callable[[], Any], timeout: float | None = 60.0) -> Any:
        """Run ``fn`` on the worker between two queries and return its result (or raise what it
        raised). Without a worker thread it runs here."""
        if self._thread is None:
            return fn()
        box: dict[str, Any] = {}
        done = threading.Event()

        def op() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # handed back to the caller
                box["error"] = e
            finally:
                done.set()
        with self._cond:
            self._ops.append(op)
            self.gate.busy()
            self._cond.notify_all()
        if not done.wait(timeout):
            raise TimeoutError("the worker did not take the request in time")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def refuse(self, stream: str, why: str) -> None:
        """A trigger refused before queuing (a bad message): received and ``why`` at once."""
        with self._cond:
            s = self._streams.get(stream)
            if s is not None:
                s.counts["received"] += 1
                s.counts[why] += 1

    # -- accounting -----------------------------------------------------------------------------
    def accounting(self) -> dict[str, dict[str, int]]:
        with self._cond:
            return {name: dict(s.counts, pending=len(s.queue) + s.in_flight)
                    for name, s in self._streams.items()}

    def _count_drop(self, s: _Stream, why: str) -> None:
        s.counts[why] += 1
        s.dropped_since_answer += 1

    def _tell_dropped(self, job: Job, why: str) -> None:
        if job.explicit:  # a client waits for this id: say what happened to it
            self._safe_publish(Failure(job.stream, job.request_id, Code.DROPPED,
                                       f"query {why} before it ran", job.stamp_ns))

    # -- the worker -----------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            self._stop = False
        self._thread = threading.Thread(target=self._loop, name="capsule_worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the job in hand (queued ones stay queued), then end the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        self.gate.quiet()   # nothing runs now: writers need not wait

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Until every queue is empty and nothing runs (False at the deadline)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or self._ops or any(s.queue for s in self._streams.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def drain(self) -> None:
        """Without a thread (offline): run every queued job now, in the worker's order, then the
        background work the worker would do in its idle time."""
        while True:
            with self._cond:
                item = self._take(wait_for_context=False)
            if item is None:
                break
            self._execute(*item)
        while self._idle_slice():
            pass

    def _loop(self) -> None:
        while True:
            with self._cond:
                item = None
                while not self._stop:
                    item = self._take(wait_for_context=True)
                    if item is None:
                        self.gate.quiet()   # nothing in hand: background writers may go
                    else:
                        self.gate.busy()
                    if item is not None or self._idle_more:
                        break
                    self._cond.wait(self._wait_s())
                if self._stop:
                    return
                self._busy = True
            try:
                if item is not None:
                    self._execute(*item)
                    self._idle_more = True   # a query may have left background work
                else:                        # nothing ready: one slice, then look again
                    self._idle_more = self._idle_slice()
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _idle_slice(self) -> bool:
        try:
            outcomes = self._idle()
        except Exception as e:  # background work must not end the worker either
            log.error("idle work failed: %s\n%s", e, traceback.format_exc())
            return False
        for outcome in outcomes or ():
            self._safe_publish(outcome)
        return outcomes is not None

    def _take(self, wait_for_context: bool) -> tuple | None:
        """Under the lock: the next op, else the next ready job, streams taken in turn."""
        if self._ops:
            return ("op", self._ops.popleft())
        n = len(self._order)
        for i in range(n):
            name = self._order[(self._next + i) % n]
            s = self._streams[name]
            while s.queue and self._is_stale(s, s.queue[0]):
                stale = s.queue.popleft()
                self._count_drop(s, "stale")
                self._tell_dropped(stale, "stale")
            if not s.queue:
                continue
            job = s.queue[0]
            if wait_for_context and not self._ready(job) \
                    and time.monotonic() - job.enqueued < self.context_wait_s:
                continue  # its context is due but not here yet; other streams go on
            s.queue.popleft()
            s.in_flight += 1
            self._next = (self._next + i + 1) % n
            return ("job", job)
        return None

    def _wait_s(self) -> float | None:
        waiting = [s.queue[0].enqueued for s in self._streams.values() if s.queue]
        if not waiting:
            return None
        return max(0.001, min(waiting) + self.context_wait_s - time.monotonic())

    def _is_stale(self, s: _Stream, job: Job) -> bool:
        limit = s.policy.max_age_ms
        return limit > 0 and (self._now_ns() - job.stamp_ns) / 1e6 > limit

    def _execute(self, kind: str, item: Any) -> None:
        if kind == "op":
            item()
            return
        job: Job = item
        with self._cond:
            s = self._streams.get(job.stream)
            dropped = s.dropped_since_answer if s is not None else 0
            seq = (s.answers + 1) if s is not None else 0
        try:
            outcomes = self._run(job, seq, dropped)
        except Exception as e:  # the error boundary: the node keeps serving
            log.error("query on %r failed: %s\n%s", job.stream, e, traceback.format_exc())
            outcomes = [Failure(job.stream, job.request_id, Code.INTERNAL,
                                f"{type(e).__name__}: {e}"[:500], job.stamp_ns, job.input)]
        verdict = _verdict(outcomes)
        with self._cond:
            s = self._streams.get(job.stream)
            if s is not None:
                s.in_flight -= 1
                s.counts[verdict] += 1
                if verdict == "answered":  # drops while it ran go to the next answer
                    s.answers += 1
                    s.dropped_since_answer -= dropped
        for outcome in outcomes:
            self._safe_publish(outcome)

    def _safe_publish(self, outcome: Outcome) -> None:
        try:
            self._publish(outcome)
        except Exception as e:  # a publishing bug must not end the worker
            log.error("publishing %s failed: %s\n%s", type(outcome).__name__, e,
                      traceback.format_exc())


def _verdict(outcomes: Iterable[Outcome]) -> str:
    outcomes = list(outcomes)
    if any(isinstance(o, Answer) for o in outcomes):
        return "answered"
    codes = [o.code for o in outcomes if isinstance(o, Failure)]
    return "rejected" if codes and codes[-1] in REJECTED_CODES else "failed"
