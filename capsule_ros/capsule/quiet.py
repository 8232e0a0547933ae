"""A signal from the query path to the background writers: "a query runs or waits; hold off".

Measured on cpu-2c (bench/query_path.py): a persist writer that hashed and wrote a 4 MB capsule
on the other core while the next query ran made that query ~25% slower, although it held the
interpreter lock for microseconds only and ran at a lower CPU priority (the two share caches and
memory bandwidth). So the writers do their work in slices and, before each slice, wait until the
query path is quiet: a query then overlaps at most the one slice that was under way when it
started. Under overload (the path never quiet), a writer waits at most until its deadline and
then goes on regardless, so what it writes is never more than that late.

The scheduler calls ``busy()`` when a trigger or an operation arrives and ``quiet()`` when it has
nothing left to run; the writers call ``pause(deadline)`` between slices. Without a gate (offline,
tools) writers never wait.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

# Bytes a writer hashes or writes between two looks at the gate: ~0.15 ms of sha256 or of a
# copy into the page cache here, so a query that starts mid-slice shares a core that briefly.
SLICE_BYTES = 256 * 1024
# How long a write may wait for a quiet query path before it goes on regardless (the most a
# persisted boundary lags its commit, plus the write itself, when queries never stop).
MAX_DEFER_S = 0.5


class QuietGate:
    def __init__(self) -> None:
        self._quiet = threading.Event()
        self._quiet.set()
        self._lock = threading.Lock()
        self.counters = {"pauses": 0, "pause_ms": 0.0, "deadline_passes": 0}
        self._waiting = 0

    def busy(self) -> None:
        self._quiet.clear()

    def quiet(self) -> None:
        self._quiet.set()

    def is_quiet(self) -> bool:
        return self._quiet.is_set()

    def wait_quiet(self, timeout: float) -> bool:
        """Until the query path is quiet (True) or ``timeout`` seconds have passed (False)."""
        return self._quiet.wait(timeout) if timeout > 0 else self._quiet.is_set()

    def pause(self, deadline: float) -> None:
        """Return when the query path is quiet, or at ``deadline`` (``time.monotonic()``)."""
        if self._quiet.is_set():
            return
        t0 = time.monotonic()
        with self._lock:
            self._waiting += 1
        quiet = self.wait_quiet(deadline - t0)
        with self._lock:
            self._waiting -= 1
            self.counters["pauses"] += 1
            self.counters["pause_ms"] += (time.monotonic() - t0) * 1e3
            if not quiet:
                self.counters["deadline_passes"] += 1

    def pauser(self, since: float, defer_s: float = MAX_DEFER_S) -> Callable[[], None]:
        """A writer's ``pause`` for work asked for at ``since`` (``time.monotonic()``): it waits
        for quiet until ``defer_s`` after that, then no longer."""
        deadline = since + defer_s
        return lambda: self.pause(deadline)

    def waiting(self) -> int:
        """Writers waiting in ``pause`` right now."""
        with self._lock:
            return self._waiting

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counters)
