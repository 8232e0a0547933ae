"""Tiers: where a capsule's bytes live, and the copies that move them. Mechanism only.

* ``device``: the live state's device; a snapshot starts here, its KV segments shared with the
  stream's earlier boundaries;
* ``host``: CPU memory (page-locked where asked, so a promotion is a fast DMA); a capsule moved
  here gets its own compacted copy, journal included;
* ``file``: one capsule file per capsule in the node's own tier directory (``TierFiles``).

Which capsule moves where, and when, is policy: ``runtime/tier_policy.py`` decides, the store
(``store.CapsuleStore.promote`` / ``demote``) carries it out with the functions here.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import threading
import time
from pathlib import Path
from types import MappingProxyType
from typing import Callable

import torch

from .capsule import Capsule, JournalEntry, KVSegment
from .files import SUFFIX, clean_stale_temps, load_capsule, save_capsule
from .fingerprint import Fingerprint
from .layout import StateLayout
from .quiet import QuietGate


class Tier(str, enum.Enum):
    DEVICE = "device"
    HOST = "host"
    FILE = "file"


ORDER = (Tier.DEVICE, Tier.HOST, Tier.FILE)
TIER_FILE_PREFIX = "tier-"


def tensors_of(capsule: Capsule) -> list[torch.Tensor]:
    """Every tensor a capsule holds: KV segments, state, meta tensors, journal."""
    out: list[torch.Tensor] = [t for seg in capsule.kv for t in seg.rows.values()]
    out += list(capsule.state.values()) + list(capsule.meta_tensors.values())
    out += [e.embeds for e in capsule.journal]
    return out


def storages(capsule: Capsule) -> dict[tuple[str, int], int]:
    """Unique tensor storages a capsule holds -> bytes (shared segments appear once per capsule;
    callers summing several capsules count each storage once)."""
    out: dict[tuple[str, int], int] = {}
    for t in tensors_of(capsule):
        n = t.untyped_storage().nbytes()
        if n:
            out[(str(t.device), t.untyped_storage().data_ptr())] = n
    return out


def copy_capsule(capsule: Capsule, device: torch.device, pin: bool = False) -> Capsule:
    """Its own compacted copy of ``capsule`` on ``device``: KV, state and journal (same id), so
    nothing of it stays behind in the tier it left; meta tensors are copied where they are."""
    def alloc(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=like.dtype, device=device,
                           pin_memory=bool(pin) and device.type == "cpu")

    def clone(t: torch.Tensor) -> torch.Tensor:
        dst = alloc(t, tuple(t.shape))
        dst.copy_(t)
        return dst

    segs: tuple[KVSegment, ...] = ()
    if capsule.kv:
        rows = {}
        for key in capsule.kv[0].rows:
            first = capsule.kv[0].rows[key]
            dst = alloc(first, (capsule.position, *first.shape[1:]))
            for seg in capsule.kv:
                dst[seg.start:seg.stop].copy_(seg.rows[key])
            rows[key] = dst
        segs = (KVSegment(0, MappingProxyType(rows)),)
    return capsule.replaced(
        kv=segs, state=MappingProxyType({k: clone(t) for k, t in capsule.state.items()}),
        # meta tensors (e.g. a generator's state, which must stay a CPU tensor) keep their device
        meta_tensors=MappingProxyType({k: t.clone() for k, t in capsule.meta_tensors.items()}),
        journal=tuple(JournalEntry(clone(e.embeds), e.source) for e in capsule.journal))


class TierFiles:
    """A node's own tier directory, with an I/O thread so that tier moves do not stall the
    caller (the query worker). Tier files are scratch (capsule ids are per process): the owner
    empties the directory when it opens it. Ownership (one live process) is the caller's
    ``places.CapsuleDirs.claim``.

    * ``write`` is write-behind: it names the file at once and the I/O thread writes it; until
      then the capsule stays in memory and a ``read`` of it copies from memory (no file).
    * ``prefetch`` reads and verifies a file on the I/O thread ahead of need (reads go before
      writes); a ``read`` takes the prefetched capsule, waits for one in flight (``waits``,
      ``wait_ms``), or, on a cold miss, reads the file itself (``reads_inline``).
    * with a ``gate`` (``quiet.QuietGate``) a write is done in slices that wait for a quiet query
      path, as the persister's (``quiet.MAX_DEFER_S`` at most); not while a read is asked for.
    """

    PREFETCH_KEEP = 8   # prefetched capsules kept unclaimed at most (oldest dropped)

    def __init__(self, directory: str | os.PathLike, layout: StateLayout,
                 gate: QuietGate | None = None) -> None:
        self.directory = Path(directory)
        self.gate = gate
        self.directory.mkdir(parents=True, exist_ok=True)
        self.layout = layout
        clean_stale_temps(self.directory)
        for p in self.directory.glob(f"{TIER_FILE_PREFIX}*{SUFFIX}"):
            p.unlink(missing_ok=True)
        self.counters = {"writes": 0, "write_failures": 0, "prefetches": 0, "prefetch_hits": 0,
                         "waits": 0, "wait_ms": 0.0, "reads_inline": 0, "reads_from_memory": 0}
        self._cond = threading.Condition()
        self._writing: dict[Path, Capsule] = {}        # written behind, not on disk yet
        self._since: dict[Path, float] = {}            # when each write was asked for
        self._kept: dict[Path, Capsule] = {}           # a write failed: kept in memory instead
        self._removed: set[Path] = set()               # removed while still being written
        self._reads: dict[Path, tuple] = {}            # prefetch requests (fingerprint, id)
        self._ready: dict[Path, Capsule] = {}          # prefetched (host memory), unclaimed
        self._in_flight: set[Path] = set()
        self._wanted: set[Path] = set()                # prefetched while still being written
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="capsule-tier-io", daemon=True)
        self._thread.start()

    # -- the caller's side (cheap) ------------------------------------------------------------
    def write(self, capsule: Capsule) -> Path:
        path = self.directory / f"{TIER_FILE_PREFIX}{capsule.id}{SUFFIX}"
        with self._cond:
            self._writing[path] = capsule
            self._since[path] = time.monotonic()
            self._removed.discard(path)
            self._cond.notify_all()
        return path

    def prefetch(self, path: Path, fingerprint: Fingerprint, capsule_id: int) -> None:
        with self._cond:
            if path in self._writing:   # still in memory: keep it there once written
                self._wanted.add(path)
                return
            if path in self._ready or path in self._in_flight:
                return
            self._reads[path] = (fingerprint, capsule_id)
            self._cond.notify_all()

    def read(self, path: Path, fingerprint: Fingerprint, capsule_id: int,
             device: torch.device) -> Capsule:
        ready = None
        with self._cond:
            pending = self._writing.get(path) or self._kept.get(path)
            if pending is None and (path in self._reads or path in self._in_flight):
                # asked for ahead of need and not done yet: wait for the I/O thread (reads go
                # first there) rather than read here; the caller reports the wait
                t0 = time.perf_counter()
                self.counters["waits"] += 1
                while (path in self._reads or path in self._in_flight) and self._thread.is_alive():
                    self._cond.wait(1.0)
                self.counters["wait_ms"] += (time.perf_counter() - t0) * 1e3
            if pending is None:
                ready = self._ready.pop(path, None)
                if ready is not None:
                    self.counters["prefetch_hits"] += 1
            else:
                self.counters["reads_from_memory"] += 1
        if pending is not None:
            return copy_capsule(pending, device)
        if ready is not None:
            return ready if _device_of(ready) == torch.device(device) else copy_capsule(ready, device)
        self.counters["reads_inline"] += 1
        loaded = load_capsule(path, fingerprint, self.layout, device=device)
        return dataclasses.replace(loaded, id=capsule_id)

    def remove(self, path: Path) -> None:
        with self._cond:
            self._ready.pop(path, None)
            self._reads.pop(path, None)
            self._kept.pop(path, None)
            self._wanted.discard(path)
            if path in self._writing:
                self._removed.add(path)   # the I/O thread drops it instead of writing it
                return
        path.unlink(missing_ok=True)

    def flush(self, timeout: float | None = None) -> bool:
        """Until every write behind is on disk (False at the deadline)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._writing:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        self.flush(timeout=60.0)
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- the I/O thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._reads or self._writing_due()):
                    self._cond.wait()
                if self._closed and not self._reads and not self._writing_due():
                    return
                if self._reads:   # a query may be waiting for this one
                    path, (fingerprint, capsule_id) = next(iter(self._reads.items()))
                    del self._reads[path]
                    self._in_flight.add(path)
                    job = ("read", path, fingerprint, capsule_id)
                else:
                    path = next(p for p in self._writing if p not in self._in_flight)
                    self._in_flight.add(path)
                    job = ("write", path, self._writing[path], None)
            try:
                if job[0] == "read":
                    self._do_read(*job[1:])
                else:
                    self._do_write(job[1], job[2])
            finally:
                with self._cond:
                    self._in_flight.discard(job[1])
                    self._cond.notify_all()

    def _writing_due(self) -> bool:
        return any(p not in self._in_flight for p in self._writing)

    def _do_read(self, path: Path, fingerprint: Fingerprint, capsule_id: int) -> None:
        try:
            loaded = dataclasses.replace(load_capsule(path, fingerprint, self.layout, device="cpu"),
                                         id=capsule_id)
        except Exception:  # noqa: BLE001 - the caller's own read will raise the real error
            return
        with self._cond:
            self.counters["prefetches"] += 1
            self._ready[path] = loaded
            while len(self._ready) > self.PREFETCH_KEEP:
                self._ready.pop(next(iter(self._ready)))

    def _pause_for(self, path: Path) -> Callable[[], None] | None:
        """Between slices of a write: wait for a quiet query path, unless a read is asked for
        (a query may be waiting for it: finish this write and go to it)."""
        if self.gate is None:
            return None
        wait = self.gate.pauser(self._since.get(path, 0.0))

        def pause() -> None:
            if not self._reads:
                wait()
        return pause

    def _do_write(self, path: Path, capsule: Capsule) -> None:
        with self._cond:
            removed = path in self._removed
        failed = False
        if not removed:
            try:
                save_capsule(capsule, self.directory, path.name[:-len(SUFFIX)], self.layout,
                             pause=self._pause_for(path))
            except Exception:  # noqa: BLE001 - e.g. disk full: kept in memory, nothing lost
                failed = True
        with self._cond:
            self._writing.pop(path, None)
            self._since.pop(path, None)
            if failed:
                self.counters["write_failures"] += 1
                self._kept[path] = capsule
            elif not removed:
                self.counters["writes"] += 1
                if path in self._wanted:   # asked for meanwhile: no need to read it back
                    self._ready[path] = capsule
            self._wanted.discard(path)
            if path in self._removed:   # removed while it was being written
                self._removed.discard(path)
                self._kept.pop(path, None)
                path.unlink(missing_ok=True)


def _device_of(capsule: Capsule) -> torch.device:
    return next(iter(capsule.state.values())).device
