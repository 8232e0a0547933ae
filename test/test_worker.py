"""The scheduler on its own (no ROS, no model): queue policies, staleness by the given clock,
fairness between streams, capsule verbs between queries, the error boundary, and accounting that
always adds up. Jobs that must be slow block on an event the test releases, never on a sleep."""
from __future__ import annotations

import threading

import pytest

from capsule_ros.runtime.outcome import Answer, Failure, TextOutput
from capsule_ros.runtime.worker import OUTCOMES, Job, Scheduler, StreamPolicy
from capsule_ros.status_codes import Code

pytestmark = pytest.mark.timeout(60)


def answer(job: Job, seq: int, dropped: int) -> list:
    return [Answer(job.stream, job.request_id, TextOutput((), "", "eos"), 0, job.stamp_ns, False,
                   0.0, 0.0, 0.0, 0.0, 0.0, seq=seq, dropped=dropped)]


def balanced(acc: dict) -> bool:
    return all(row["received"] == sum(row[k] for k in OUTCOMES) + row["pending"]
               for row in acc.values())


class Recorder:
    def __init__(self) -> None:
        self.out: list = []
        self.lock = threading.Lock()

    def __call__(self, outcome) -> None:
        with self.lock:
            self.out.append(outcome)

    def answers(self) -> list[Answer]:
        with self.lock:
            return [o for o in self.out if isinstance(o, Answer)]


def job(stream: str, stamp: int, explicit: bool = False, rid: int = 0) -> Job:
    return Job(stream, stamp, False, request_id=rid, explicit=explicit)


def test_latest_supersedes_waiting_triggers_and_answers_carry_the_drop_count():
    gate, started = threading.Event(), threading.Event()
    rec = Recorder()

    def run(j, seq, dropped):
        if j.stamp_ns == 1:
            started.set()
            gate.wait()
        return answer(j, seq, dropped)
    s = Scheduler(run, rec, now_ns=lambda: 0)
    s.add_stream("cam", StreamPolicy("latest"))
    s.start()
    try:
        s.submit(job("cam", 1))
        assert started.wait(10)          # the first job runs and blocks
        for stamp in (2, 3, 4):          # three more arrive meanwhile: only the newest waits
            s.submit(job("cam", stamp))
        assert s.accounting()["cam"]["superseded"] == 2
        gate.set()
        assert s.wait_idle(10)
    finally:
        s.stop()
    got = [(a.stamp_ns, a.seq, a.dropped) for a in rec.answers()]
    assert got == [(1, 1, 0), (4, 2, 2)]
    acc = s.accounting()
    assert acc["cam"] == {"received": 4, "answered": 2, "superseded": 2, "overflowed": 0,
                          "stale": 0, "rejected": 0, "failed": 0, "pending": 0}


def test_fifo_overflows_the_oldest_and_a_dropped_query_gets_a_status_with_its_id():
    rec = Recorder()
    s = Scheduler(answer, rec, now_ns=lambda: 0)
    s.add_stream("arm", StreamPolicy("fifo", depth=2))
    for rid in (11, 12, 13):             # no worker yet: all three wait, one overflows
        s.submit(job("arm", rid, explicit=True, rid=rid))
    s.drain()
    dropped = [o for o in rec.out if isinstance(o, Failure)]
    assert [(f.request_id, f.code) for f in dropped] == [(11, Code.DROPPED)]
    assert [a.request_id for a in rec.answers()] == [12, 13]
    assert s.accounting()["arm"]["overflowed"] == 1 and balanced(s.accounting())


def test_stale_triggers_are_dropped_by_the_given_clock():
    now = {"ns": 0}
    rec = Recorder()
    s = Scheduler(answer, rec, now_ns=lambda: now["ns"])
    s.add_stream("cam", StreamPolicy("fifo", depth=10, max_age_ms=100.0))
    s.submit(job("cam", 1_000_000_000))
    s.submit(job("cam", 1_150_000_000))
    now["ns"] = 1_200_000_000            # the first is 200 ms old, the second 50 ms
    s.drain()
    assert [a.stamp_ns for a in rec.answers()] == [1_150_000_000]
    assert rec.answers()[0].dropped == 1
    assert s.accounting()["cam"]["stale"] == 1 and balanced(s.accounting())


def test_streams_take_turns_and_each_keeps_its_order():
    rec = Recorder()
    s = Scheduler(answer, rec, now_ns=lambda: 0)
    for name in ("a", "b"):
        s.add_stream(name, StreamPolicy("fifo", depth=10))
    for stamp in (1, 2, 3):
        s.submit(job("a", stamp))
    s.submit(job("b", 10))
    s.drain()
    assert [(a.stream, a.stamp_ns) for a in rec.answers()] == [("a", 1), ("b", 10), ("a", 2), ("a", 3)]


def test_an_exception_is_an_internal_status_and_the_next_job_is_answered():
    rec = Recorder()

    def run(j, seq, dropped):
        if j.stamp_ns == 1:
            raise ZeroDivisionError("a bug in act")
        return answer(j, seq, dropped)
    s = Scheduler(run, rec, now_ns=lambda: 0)
    s.add_stream("cam", StreamPolicy("fifo"))
    s.start()
    try:
        s.submit(job("cam", 1, rid=5))
        s.submit(job("cam", 2))
        assert s.wait_idle(10)
    finally:
        s.stop()
    failure, ans = rec.out
    assert isinstance(failure, Failure) and failure.code == Code.INTERNAL
    assert failure.request_id == 5 and "ZeroDivisionError: a bug in act" in failure.text
    assert isinstance(ans, Answer) and ans.stamp_ns == 2 and ans.seq == 1
    assert s.accounting()["cam"]["failed"] == 1 and balanced(s.accounting())


def test_a_publisher_that_raises_does_not_end_the_worker():
    calls = []

    def publish(outcome):
        calls.append(outcome)
        if len(calls) == 1:
            raise RuntimeError("publisher broke")
    s = Scheduler(answer, publish, now_ns=lambda: 0)
    s.add_stream("cam", StreamPolicy("fifo"))
    s.start()
    try:
        s.submit(job("cam", 1))
        s.submit(job("cam", 2))
        assert s.wait_idle(10)
    finally:
        s.stop()
    assert [o.stamp_ns for o in calls] == [1, 2]


def test_verbs_run_between_queries_on_the_worker():
    gate, started = threading.Event(), threading.Event()
    order = []

    def run(j, seq, dropped):
        order.append(("query", j.stamp_ns, threading.current_thread().name))
        if j.stamp_ns == 1:
            started.set()
            gate.wait()
        return answer(j, seq, dropped)
    s = Scheduler(run, Recorder(), now_ns=lambda: 0)
    s.add_stream("cam", StreamPolicy("fifo"))
    s.start()
    try:
        s.submit(job("cam", 1))
        assert started.wait(10)
        s.submit(job("cam", 2))
        result = {}
        caller = threading.Thread(target=lambda: result.setdefault(
            "v", s.call(lambda: order.append(("verb", threading.current_thread().name)) or 7)))
        caller.start()
        gate.set()
        caller.join(10)
        assert s.wait_idle(10)
    finally:
        s.stop()
    assert result["v"] == 7
    assert [o[:2] for o in order] == [("query", 1), ("verb", "capsule_worker"), ("query", 2)]


def test_a_refused_message_is_received_and_rejected():
    s = Scheduler(answer, Recorder(), now_ns=lambda: 0)
    s.add_stream("cam", StreamPolicy())
    s.refuse("cam", "rejected")
    assert s.accounting()["cam"]["rejected"] == 1 and balanced(s.accounting())


def test_jobs_handed_on_out_of_order_wait_in_stamp_order():
    """Callbacks on several executor threads may hand on out of order: latest keeps the newest
    stamp whatever came last, fifo runs by stamp."""
    rec = Recorder()
    s = Scheduler(answer, rec, now_ns=lambda: 0)
    s.add_stream("cam", StreamPolicy("latest"))
    s.add_stream("arm", StreamPolicy("fifo", depth=10))
    for stamp in (3, 1, 2):
        s.submit(job("cam", stamp))
        s.submit(job("arm", stamp))
    s.drain()
    assert [a.stamp_ns for a in rec.answers() if a.stream == "cam"] == [3]
    assert [a.stamp_ns for a in rec.answers() if a.stream == "arm"] == [1, 2, 3]
    assert s.accounting()["cam"]["superseded"] == 2 and balanced(s.accounting())


def test_the_writers_gate_is_busy_while_a_job_is_in_hand_and_quiet_when_none_is():
    release, started = threading.Event(), threading.Event()
    seen = []

    def run(j, seq, dropped):
        seen.append(s.gate.is_quiet())
        started.set()
        release.wait(10)
        return answer(j, seq, dropped)
    s = Scheduler(run, Recorder(), now_ns=lambda: 0)
    s.add_stream("cam", StreamPolicy("fifo"))
    s.start()
    try:
        assert s.gate.wait_quiet(10)             # nothing queued: writers may go
        s.submit(job("cam", 1))
        assert started.wait(10)
        assert not s.gate.is_quiet()             # a query runs: writers hold off
        s.submit(job("cam", 2))
        release.set()
        assert s.wait_idle(10)
        assert s.gate.wait_quiet(10)             # both answered: quiet again
    finally:
        s.stop()
    assert seen == [False, False]
    assert s.gate.is_quiet()
