"""Bounded per-stream figures for diagnostics: latency splits, message rate, stamp delay,
counters and context fill. Imports no ROS.

Memory is bounded whatever the run length: every sample series is a ``deque`` with a fixed
``maxlen`` (the window), so a node that runs for weeks keeps the last ``window`` queries only.

Percentiles use the **nearest-rank** method: the p-th percentile of n sorted values is the
value at rank ``ceil(p / 100 * n)`` (1-based), i.e. the smallest sample with at least p % of the
samples at or below it. It is always an observed value (no interpolation), and with few samples
p99 is simply the maximum, which is the honest answer for a latency tail.

Times are passed in (``now_ns``, ``receive_ns``, ``stamp_ns``: integer nanoseconds on the
node's clock), never read here, so the figures follow sim time and are exact to test.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

DEFAULT_WINDOW = 512          # queries (and messages) kept per stream
DEFAULT_RATE_WINDOW_S = 5.0   # the message rate is over the last 5 s of receive times

LATENCY_PARTS = ("restore_ms", "append_ms", "act_ms", "commit_ms", "total_ms")


def percentile(values: Iterable[float], p: float) -> float:
    """Nearest-rank p-th percentile (0 < p <= 100) of ``values``; NaN when there are none."""
    if not 0.0 < p <= 100.0:
        raise ValueError(f"percentile p must be in (0, 100], got {p}")
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = math.ceil(p / 100.0 * len(ordered))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Spread:
    """p50 and p99 of one series, and how many samples they rest on."""
    p50: float = math.nan
    p99: float = math.nan
    samples: int = 0

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        if not values:
            return cls()
        return cls(percentile(values, 50), percentile(values, 99), len(values))


@dataclass(frozen=True)
class StreamSnapshot:
    """One consistent reading of a stream's figures (what a diagnostics status shows)."""
    stream: str
    queries: int                      # answered queries since start
    errors: int                       # failed queries since start
    consecutive_errors: int           # failed queries since the last answer
    position: int                     # context position (tokens in the boundary)
    max_context: int                  # the model's context limit (0 = unknown)
    messages: int                     # trigger/context messages received since start
    rate_hz: float                    # message rate over the rate window (0 when < 2 messages)
    since_last_message_s: float       # NaN before the first message
    stamp_delay_ms: Spread            # receive time - header stamp
    latency_ms: dict[str, Spread] = field(default_factory=dict)  # LATENCY_PARTS -> Spread

    @property
    def context_fraction(self) -> float:
        """Position / max context; 0 when the limit is unknown."""
        return self.position / self.max_context if self.max_context > 0 else 0.0


class StreamFigures:
    """The figures of one stream. Thread-safe: recorders (callbacks) and the diagnostics timer
    may run on different executor threads."""

    def __init__(self, stream: str, window: int = DEFAULT_WINDOW,
                 rate_window_s: float = DEFAULT_RATE_WINDOW_S, max_context: int = 0) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if rate_window_s <= 0:
            raise ValueError(f"rate_window_s must be > 0, got {rate_window_s}")
        self.stream = stream
        self.window = window
        self.rate_window_ns = int(rate_window_s * 1e9)
        self._lock = threading.Lock()
        self._latency: deque[tuple[float, ...]] = deque(maxlen=window)
        self._receive_ns: deque[int] = deque(maxlen=window)
        self._delay_ms: deque[float] = deque(maxlen=window)
        self._queries = self._errors = self._consecutive = self._messages = 0
        self._position, self._max_context = 0, int(max_context)

    # -- recorders (cheap: an append under a lock) ------------------------------------------
    def record_message(self, receive_ns: int, stamp_ns: int | None = None) -> None:
        """A message for this stream arrived at ``receive_ns``; ``stamp_ns`` is its header stamp
        (None for headerless types: no stamp delay then)."""
        with self._lock:
            self._messages += 1
            self._receive_ns.append(int(receive_ns))
            if stamp_ns is not None:
                self._delay_ms.append((int(receive_ns) - int(stamp_ns)) / 1e6)

    def record_answer(self, restore_ms: float, append_ms: float, act_ms: float,
                      commit_ms: float, position: int | None = None) -> None:
        """An answered query with its latency split (total = the sum of the four parts) and,
        when given, the context position after it. Ends a run of errors."""
        parts = (float(restore_ms), float(append_ms), float(act_ms), float(commit_ms))
        with self._lock:
            self._latency.append(parts + (sum(parts),))
            self._queries += 1
            self._consecutive = 0
            if position is not None:
                self._position = int(position)

    def record_error(self) -> None:
        """A query that produced no answer (bad input, refused restore or commit, ...)."""
        with self._lock:
            self._errors += 1
            self._consecutive += 1

    def set_context(self, position: int, max_context: int | None = None) -> None:
        """The context position changed outside a query (reset, rollback, load, rebase)."""
        with self._lock:
            self._position = int(position)
            if max_context is not None:
                self._max_context = int(max_context)

    # -- reading --------------------------------------------------------------------------
    def snapshot(self, now_ns: int) -> StreamSnapshot:
        with self._lock:
            latency = list(self._latency)
            receives = list(self._receive_ns)
            delays = list(self._delay_ms)
            counters = (self._queries, self._errors, self._consecutive)
            position, max_context, messages = self._position, self._max_context, self._messages
        return StreamSnapshot(
            stream=self.stream, queries=counters[0], errors=counters[1],
            consecutive_errors=counters[2], position=position, max_context=max_context,
            messages=messages, rate_hz=self._rate_hz(receives, now_ns),
            since_last_message_s=(now_ns - receives[-1]) / 1e9 if receives else math.nan,
            stamp_delay_ms=Spread.of(delays),
            latency_ms={part: Spread.of([row[i] for row in latency])
                        for i, part in enumerate(LATENCY_PARTS)})

    def _rate_hz(self, receives: list[int], now_ns: int) -> float:
        """Mean arrival rate of the messages received in the last rate window:
        (n - 1) / (last - first). Interval-based, so neither a young stream nor the window's
        sample cap biases it; 0 when fewer than two messages fall in the window."""
        recent = [t for t in receives if now_ns - t < self.rate_window_ns]
        if len(recent) < 2 or recent[-1] <= recent[0]:
            return 0.0
        return (len(recent) - 1) / ((recent[-1] - recent[0]) / 1e9)


class Figures:
    """The figures of every stream, by name. Streams are added on first use (a forked or
    loaded stream appears without ceremony) and removed with ``drop``."""

    def __init__(self, window: int = DEFAULT_WINDOW,
                 rate_window_s: float = DEFAULT_RATE_WINDOW_S, max_context: int = 0) -> None:
        self.window, self.rate_window_s, self.max_context = window, rate_window_s, max_context
        self._streams: dict[str, StreamFigures] = {}
        self._lock = threading.Lock()

    def stream(self, name: str) -> StreamFigures:
        with self._lock:
            figures = self._streams.get(name)
            if figures is None:
                figures = self._streams[name] = StreamFigures(
                    name, self.window, self.rate_window_s, self.max_context)
            return figures

    def drop(self, name: str) -> None:
        with self._lock:
            self._streams.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._streams)

    def snapshots(self, now_ns: int) -> list[StreamSnapshot]:
        """Every stream's snapshot, sorted by name."""
        with self._lock:
            streams = sorted(self._streams.items())
        return [figures.snapshot(now_ns) for _, figures in streams]
