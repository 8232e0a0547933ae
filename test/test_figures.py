"""capsule_ros.runtime.figures: nearest-rank percentiles, bounded windows, rate, stamp delay,
counters, context fill. Expected values are worked out by hand in the comments."""
from __future__ import annotations

import math
import tracemalloc

import pytest

from capsule_ros.runtime.figures import Figures, StreamFigures, percentile

MS = 1_000_000  # ns
S = 1_000_000_000


# -- percentile (nearest rank) ---------------------------------------------------------------
@pytest.mark.parametrize("p, expected", [(5, 15), (30, 20), (40, 20), (50, 35), (100, 50)])
def test_nearest_rank_textbook_sample(p, expected):
    # The worked example of the nearest-rank method (Wikipedia, "Percentile"):
    # ranks ceil(p/100 * 5) = 1, 2, 2, 3, 5 of the sorted sample.
    assert percentile([15, 20, 35, 40, 50], p) == expected


@pytest.mark.parametrize("p, expected", [(25, 7), (50, 8), (75, 15), (100, 20)])
def test_nearest_rank_ten_values_unsorted(p, expected):
    # sorted: 3 6 7 8 8 10 13 15 16 20; ranks ceil(2.5)=3 -> 7, 5 -> 8, ceil(7.5)=8 -> 15, 10 -> 20
    assert percentile([15, 20, 3, 8, 6, 16, 13, 7, 10, 8], p) == expected


def test_p99_of_one_to_hundred_and_of_a_small_sample():
    assert percentile(range(1, 101), 99) == 99   # rank 99
    assert percentile(range(1, 101), 50) == 50   # rank 50
    assert percentile(range(1, 11), 99) == 10    # rank ceil(9.9) = 10: the maximum


def test_percentile_of_nothing_is_nan_and_bad_p_is_refused():
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 0)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


# -- latency window --------------------------------------------------------------------------
def test_latency_split_total_and_spread():
    f = StreamFigures("front", window=8)
    for restore in (5.0, 1.0, 4.0, 2.0, 3.0):
        f.record_answer(restore, 10.0, 20.0, 0.5)
    snap = f.snapshot(now_ns=0)
    assert snap.latency_ms["restore_ms"].p50 == 3.0   # sorted 1 2 3 4 5, rank 3
    assert snap.latency_ms["restore_ms"].p99 == 5.0   # rank ceil(4.95) = 5
    assert snap.latency_ms["restore_ms"].samples == 5
    # total = restore + 10 + 20 + 0.5: 31.5 .. 35.5
    assert snap.latency_ms["total_ms"].p50 == 33.5
    assert snap.latency_ms["total_ms"].p99 == 35.5
    assert snap.latency_ms["commit_ms"].p50 == 0.5


def test_window_keeps_only_the_latest_queries_over_100k_samples():
    f = StreamFigures("front", window=512)
    for i in range(100_000):
        f.record_answer(float(i), 0.0, 0.0, 0.0)
        f.record_message(receive_ns=i * MS, stamp_ns=i * MS - (i % 7) * MS)
    snap = f.snapshot(now_ns=100_000 * MS)
    assert snap.latency_ms["restore_ms"].samples == 512
    assert snap.stamp_delay_ms.samples == 512
    assert snap.queries == 100_000 and snap.messages == 100_000
    # the window holds 99488 .. 99999; rank 256 -> 99743, rank ceil(506.88) = 507 -> 99994
    assert snap.latency_ms["restore_ms"].p50 == 99_743.0
    assert snap.latency_ms["restore_ms"].p99 == 99_994.0


def test_memory_does_not_grow_with_run_length():
    f = StreamFigures("front", window=512)

    def feed(n: int, start: int) -> None:
        for i in range(start, start + n):
            f.record_answer(1.0, 2.0, 3.0, 4.0, position=i)
            f.record_message(receive_ns=i * MS, stamp_ns=i * MS)
            if i % 10 == 0:
                f.record_error()

    feed(2_000, 0)  # fill every window first
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        feed(100_000, 2_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # An unbounded list of 100k latency rows alone would be several MB; the windows are full,
    # so only small-int churn remains.
    assert grown < 64 * 1024


# -- rate, stamp delay ------------------------------------------------------------------------
def test_rate_over_the_recent_window():
    f = StreamFigures("front", rate_window_s=5.0)
    f.record_message(receive_ns=-10 * S)            # 11 s before "now": outside the window
    for k in range(11):                              # 0, 0.1, ..., 1.0 s: 10 intervals in 1 s
        f.record_message(receive_ns=k * 100 * MS)
    snap = f.snapshot(now_ns=1 * S + 500 * MS)
    assert snap.rate_hz == pytest.approx(10.0)
    assert snap.since_last_message_s == pytest.approx(0.5)
    assert snap.messages == 12
    assert f.snapshot(now_ns=20 * S).rate_hz == 0.0  # nothing in the last 5 s


def test_rate_needs_two_messages():
    f = StreamFigures("front")
    assert f.snapshot(now_ns=0).rate_hz == 0.0
    assert math.isnan(f.snapshot(now_ns=0).since_last_message_s)
    f.record_message(receive_ns=0)
    assert f.snapshot(now_ns=S).rate_hz == 0.0


def test_stamp_delay_and_headerless_messages():
    f = StreamFigures("front")
    for delay_ms in (3, 1, 2):
        f.record_message(receive_ns=50 * S, stamp_ns=50 * S - delay_ms * MS)
    f.record_message(receive_ns=51 * S)              # headerless: no delay sample
    snap = f.snapshot(now_ns=52 * S)
    assert snap.stamp_delay_ms.samples == 3
    assert snap.stamp_delay_ms.p50 == pytest.approx(2.0)
    assert snap.stamp_delay_ms.p99 == pytest.approx(3.0)


# -- counters and context ----------------------------------------------------------------------
def test_consecutive_errors_end_with_an_answer():
    f = StreamFigures("front")
    for _ in range(3):
        f.record_error()
    snap = f.snapshot(0)
    assert (snap.queries, snap.errors, snap.consecutive_errors) == (0, 3, 3)
    f.record_answer(1.0, 1.0, 1.0, 1.0, position=40)
    f.record_error()
    snap = f.snapshot(0)
    assert (snap.queries, snap.errors, snap.consecutive_errors) == (1, 4, 1)
    assert snap.position == 40


def test_context_position_against_max_context():
    f = StreamFigures("front", max_context=512)
    f.record_answer(1.0, 1.0, 1.0, 1.0, position=256)
    assert f.snapshot(0).context_fraction == 0.5
    f.set_context(0)                                 # a reset
    assert f.snapshot(0).position == 0
    f.set_context(100, max_context=400)
    snap = f.snapshot(0)
    assert (snap.position, snap.max_context, snap.context_fraction) == (100, 400, 0.25)
    assert StreamFigures("x").snapshot(0).context_fraction == 0.0  # unknown limit


def test_book_creates_streams_on_first_use_and_drops_them():
    book = Figures(window=4, max_context=64)
    book.stream("wrist").record_error()
    book.stream("front").record_answer(1.0, 1.0, 1.0, 1.0)
    assert book.names() == ["front", "wrist"]
    snaps = book.snapshots(now_ns=0)
    assert [s.stream for s in snaps] == ["front", "wrist"]
    assert snaps[0].max_context == 64 and snaps[1].errors == 1
    assert book.stream("front").window == 4
    book.drop("wrist")
    assert book.names() == ["front"]


def test_bad_windows_are_refused():
    with pytest.raises(ValueError):
        StreamFigures("x", window=0)
    with pytest.raises(ValueError):
        StreamFigures("x", rate_window_s=0.0)
