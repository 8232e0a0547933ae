"""Persist-on-commit, off the query path, and reload at start.

``Persister.submit(stream, capsule)`` is O(1) on the caller's thread: it records the capsule as
the stream's latest and wakes a background writer. The writer saves each stream's latest
capsule (``files.save_capsule``: temp file, fsync, atomic rename, directory fsync) as
``<directory>/<stream>.capsule.safetensors``; ``directory`` is the node's ``streams/`` directory
(``places.CapsuleDirs.streams``), which nothing else writes: one writer per file. A stream committed again before its file was
written is written once, with the newest capsule (the older one is *superseded*). Capsules are
immutable, so the writer reads them without locks while the engine goes on.

Costing the query nothing: ``submit`` only records the capsule (and, for device tensors, a CUDA
event). The writer hashes and writes the capsule's own CPU buffers (``files.encode_parts``: no
joined copy, no large allocation; sha256 and ``os.write`` release the interpreter lock), copies
device tensors on a side stream, and runs at a lower CPU priority than the query path
(``nice``), so on a small CPU the worker is scheduled first; the short stretches where it holds
the interpreter lock are Python bookkeeping, microseconds per tensor. With a ``gate``
(``quiet.QuietGate``, the scheduler's) it hashes and writes in slices and waits before each one
until no query runs or waits, at most ``max_defer_s`` after the stream's oldest unwritten commit:
a query overlaps at most one slice of it (that overlap, not the interpreter lock, was what cost
a query time: see ``quiet``). ``lag_ms_max`` is the longest a commit waited to be on disk.

``flush()`` waits until everything submitted so far is on disk; ``close()`` flushes and stops the
writer. ``load_all(expected, names)`` reads the named streams back, verified (files of other
names are neither read nor touched); files that fail any check are refused, reported in
``refused`` (and the log), and skipped, never fatal. Temp files of a crashed earlier writer are
removed when the persister starts.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .capsule import Capsule
from .errors import CapsuleError, CapsuleNotFound
from .files import clean_stale_temps, load_capsule, save_capsule
from .fingerprint import Fingerprint
from .layout import StateLayout
from .names import check_name
from .quiet import MAX_DEFER_S, QuietGate

log = logging.getLogger(__name__)

# The writer's nice value (Linux: per thread). Enough below the query path that the worker wins
# a contended core; not so low that the writer, holding the interpreter lock for a few
# microseconds, could be starved with it for long (that would stall the worker on the lock).
NICE = 10


def _ready_event(capsule: Capsule) -> Any:
    """A CUDA event after the capsule's device tensors were written (recorded on the caller's
    stream, a few microseconds), so the writer's copies need not wait for anything else."""
    t = next((t for seg in capsule.kv[:1] for t in seg.rows.values()),
             next(iter(capsule.state.values()), None))
    if t is None or t.device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(t.device))
    return event


def _lower_priority(nice: int) -> None:
    """Lower this thread's CPU priority by ``nice`` (Linux applies setpriority to a thread id)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + nice))
    except OSError as e:  # not permitted here: the writer runs at the node's priority
        log.info("persist writer keeps its CPU priority: %s", e)


class Persister:
    def __init__(self, directory: str | os.PathLike, layout: StateLayout, *,
                 on_error: Callable[[str, Exception], None] | None = None,
                 nice: int = NICE, gate: QuietGate | None = None,
                 max_defer_s: float = MAX_DEFER_S) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cleaned = clean_stale_temps(self.directory)   # a crashed writer's leftovers
        self.layout = layout
        self.on_error = on_error
        self.nice = nice
        self.gate = gate
        self.max_defer_s = max_defer_s
        self.counters = {"submitted": 0, "saved": 0, "superseded": 0, "failed": 0,
                         "bytes_written": 0, "save_ms_last": 0.0, "save_ms_max": 0.0,
                         "save_ms_total": 0.0, "lag_ms_max": 0.0}
        self.errors: dict[str, str] = {}           # stream -> last save error
        self.refused: dict[str, str] = {}          # file name -> why load_all refused it
        # waiting to be written, newest per stream: (capsule, CUDA event or None, when the
        # oldest commit it stands for was submitted)
        self._latest: dict[str, tuple[Capsule, Any, float]] = {}
        self._cond = threading.Condition()
        self._busy = 0                             # capsules being written right now
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="capsule-persist", daemon=True)
        self._thread.start()

    # -- query-path side -------------------------------------------------------------------
    def submit(self, stream: str, capsule: Capsule | None) -> None:
        """Persist ``capsule`` as ``stream``'s boundary (latest wins). None: nothing to write."""
        check_name(stream)
        if capsule is None:
            return
        ready = _ready_event(capsule)
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise CapsuleError("persister is closed")
            if stream in self._latest:
                self.counters["superseded"] += 1
                now = self._latest[stream][2]   # the deferral counts from the oldest commit
            self._latest[stream] = (capsule, ready, now)
            self.counters["submitted"] += 1
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._latest) + self._busy

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every capsule submitted so far is written (or failed). False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._latest or self._busy:
                if not self._thread.is_alive():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 0.5)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the writer. Idempotent."""
        ok = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return ok

    def __enter__(self) -> "Persister":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writer ----------------------------------------------------------------------------
    def _run(self) -> None:
        _lower_priority(self.nice)
        while True:
            with self._cond:
                while not self._latest and not self._closed:
                    self._cond.wait()
                if not self._latest and self._closed:
                    return
                stream = next(iter(self._latest))
                capsule, ready, since = self._latest.pop(stream)
                self._busy += 1
                closing = self._closed
            t0 = time.perf_counter()
            pause = (self.gate.pauser(since, self.max_defer_s)
                     if self.gate is not None and not closing else None)
            try:
                path = save_capsule(capsule, self.directory, stream, self.layout, ready=ready,
                                    pause=pause)
                size = path.stat().st_size
            except Exception as e:  # a full disk must not take the node down
                with self._cond:
                    self.counters["failed"] += 1
                    self.errors[stream] = str(e)
                log.warning("persisting stream %r failed: %s", stream, e)
                if self.on_error is not None:
                    try:
                        self.on_error(stream, e)
                    except Exception:  # pragma: no cover - a callback's own failure
                        log.exception("persist on_error callback failed")
            else:
                ms = (time.perf_counter() - t0) * 1e3
                with self._cond:
                    self.counters["saved"] += 1
                    self.counters["bytes_written"] += size
                    self.counters["save_ms_total"] += ms
                    self.counters["save_ms_last"] = ms
                    self.counters["save_ms_max"] = max(self.counters["save_ms_max"], ms)
                    self.counters["lag_ms_max"] = max(self.counters["lag_ms_max"],
                                                      (time.monotonic() - since) * 1e3)
                    self.errors.pop(stream, None)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    # -- start-up --------------------------------------------------------------------------
    def load_all(self, expected: Fingerprint, names: Iterable[str],
                 device: str = "cpu") -> dict[str, Capsule]:
        """The persisted capsules of ``names`` (the configured or adopted streams), verified.
        A missing file is no error (the stream starts empty); a bad one is refused and reported
        in ``self.refused`` (name -> reason), never raised."""
        out: dict[str, Capsule] = {}
        self.refused = {}
        for name in names:
            try:
                out[name] = load_capsule((self.directory, name), expected, self.layout, device=device)
            except CapsuleNotFound:
                continue
            except CapsuleError as e:
                self.refused[name] = str(e)
                log.warning("not reloading persisted stream %r: %s", name, e)
            except Exception as e:  # pragma: no cover - anything unexpected is a refusal too
                self.refused[name] = f"{type(e).__name__}: {e}"
                log.warning("not reloading persisted stream %r: %s", name, e)
        return out

    def stats(self) -> dict:
        with self._cond:
            return {**self.counters, "pending": len(self._latest) + self._busy,
                    "errors": dict(self.errors)}
