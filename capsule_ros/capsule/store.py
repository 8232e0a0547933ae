"""The capsule store: a plain map of slots (one per stream) and its verbs. Mechanism only.

A slot holds the stream's current boundary, a short history of earlier ones (for rollback, the
empty context included), an optional base (for reset) and accounting. Slots refer to capsules
through ``Held`` records, so a capsule can sit in the device tier, the host tier or a file while
the slot keeps its place. Bytes move between tiers only on ``promote`` and ``demote``; reading
(``current``, ``history``, ``base``) never moves anything, and refuses a capsule that sits in a
file (``CapsuleNotInMemory``). Which capsule moves when is the tier policy's business
(``runtime/tier_policy.py``); without one nothing ever moves.

Verbs that fail raise ``CapsuleError`` and change nothing. A commit shares the KV segments of the
boundary it grew from; when a chain grows past ``max_segments`` the store merges a run of segments
that every holder either holds whole or not at all (``_compact``), so no row is ever held twice.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from .capsule import JOURNAL, Capsule, merge_segments
from .errors import CapsuleError, CapsuleNotInMemory
from .fingerprint import Fingerprint
from .names import check_name
from .tiers import ORDER, Tier, TierFiles, copy_capsule, storages

KINDS = ("kv", "state", "meta", JOURNAL)


@dataclass(eq=False)
class Held:
    """One capsule the store holds, wherever its bytes are. Slots refer to these."""

    id: int
    capsule: Capsule | None          # None while in the file tier
    tier: Tier
    position: int
    fingerprint: Fingerprint
    nbytes: dict[str, int]           # by kind, as a compacted copy holds them
    storages: dict = field(default_factory=dict)  # device tier: storage key -> bytes
    last_used: int = 0
    refs: int = 0
    path: Path | None = None

    @property
    def own(self) -> int:
        """Bytes of a compacted copy (what a host or file tier holds for it)."""
        return sum(self.nbytes.values())


@dataclass
class Refs:
    """Who refers to which capsule (ids), as a planner sees it."""

    anchors: set[int]                  # current or base of some slot: never dropped
    pinned: set[int]                   # referenced by a pinned slot: never moved or dropped
    histories: list[list[int | None]]  # each slot's history ids, oldest first (None: empty)


class Slot:
    """Per-stream record. ``current`` None = empty context; ``base`` is what reset returns to."""

    def __init__(self, current: Held | None = None, base: Held | None = None) -> None:
        self.held_current = current
        self.held_history: deque[Held | None] = deque()   # newest last; None: the empty context
        self.held_base = base
        self.pinned = False
        self.commits = 0

    @property
    def current(self) -> Capsule | None:
        return _in_memory(self.held_current)

    @property
    def base(self) -> Capsule | None:
        return _in_memory(self.held_base)

    @property
    def history(self) -> tuple[Capsule | None, ...]:
        return tuple(_in_memory(h) for h in self.held_history)

    @property
    def position(self) -> int:
        return self.held_current.position if self.held_current is not None else 0

    def tiers(self) -> dict:
        """Where the current boundary, history entries and base are."""
        t = lambda h: None if h is None else h.tier.value  # noqa: E731
        return {"current": t(self.held_current), "history": [t(h) for h in self.held_history],
                "base": t(self.held_base)}

    def held(self) -> list[Held]:
        return [h for h in (self.held_current, self.held_base, *self.held_history) if h is not None]


def _in_memory(h: Held | None) -> Capsule | None:
    if h is None:
        return None
    if h.capsule is None:
        raise CapsuleNotInMemory(f"capsule at position {h.position} is in the file tier; "
                                 "promote it first")
    return h.capsule


class CapsuleStore:
    def __init__(self, history_depth: int = 8, *, max_segments: int = 32,
                 device: torch.device | str = "cpu", pin_host: bool = False,
                 files: TierFiles | None = None) -> None:
        if history_depth < 0:
            raise ValueError("history_depth must be >= 0")
        if max_segments < 2:
            raise ValueError("max_segments must be >= 2")
        self.history_depth = history_depth
        self.max_segments = max_segments
        self.compact_hard_factor = 4   # commit compacts by itself past max_segments * this
        self.device = torch.device(device)
        self.pin_host = pin_host
        self.files = files            # the file tier (None: no file tier)
        self._slots: dict[str, Slot] = {}
        self._held: dict[int, Held] = {}
        self._clock = 0
        self.counters = {"moves": 0, "moves_by_path": {}, "promotions": 0,
                         "promotions_by_path": {}, "evictions": 0, "compactions": 0}

    # -- queries --------------------------------------------------------------------------
    def __contains__(self, stream: str) -> bool:
        return stream in self._slots

    def slot(self, stream: str) -> Slot:
        try:
            return self._slots[stream]
        except KeyError:
            raise CapsuleError(f"unknown stream {stream!r}") from None

    def current(self, stream: str) -> Capsule | None:
        """The stream's boundary (None: empty); ``CapsuleNotInMemory`` while it sits in a file."""
        slot = self.slot(stream)
        self._touch(slot.held_current)
        return slot.current

    def position(self, stream: str) -> int:
        return self.slot(stream).position

    def list(self) -> list[str]:
        return sorted(self._slots)

    def held(self) -> list[Held]:
        """Every capsule the store holds (each once), wherever it is."""
        return list(self._held.values())

    def capsules(self) -> list[Capsule]:
        """Every distinct capsule held in memory (device or host tier)."""
        return [h.capsule for h in self._held.values() if h.capsule is not None]

    def record(self, capsule: Capsule) -> Held:
        """The store's record of ``capsule`` (a fresh, unregistered one if not held yet)."""
        known = self._held.get(capsule.id)
        if known is not None:
            return known
        return Held(id=capsule.id, capsule=capsule, tier=Tier.DEVICE, position=capsule.position,
                    fingerprint=capsule.fingerprint, nbytes=capsule.nbytes_by_kind(),
                    storages=storages(capsule), last_used=self._tick())

    def refs(self, *, commit: tuple[str, int | None] | None = None,
             base: tuple[str, int | None] | None = None, new_slot: int | None = None) -> Refs:
        """References now, or as they would be after committing capsule id ``commit[1]`` to
        stream ``commit[0]``, setting a base, or adding a slot at ``new_slot``."""
        anchors: set[int] = set()
        pinned: set[int] = set()
        histories: list[list[int | None]] = []
        for name, slot in self._slots.items():
            cur = _id(slot.held_current)
            hist = [_id(h) for h in slot.held_history]
            b = _id(slot.held_base)
            if commit is not None and commit[0] == name:
                hist, cur = self._trimmed(hist + [cur] if self.history_depth else hist), commit[1]
            if base is not None and base[0] == name:
                b = base[1]
            histories.append(hist)
            ids = {i for i in (cur, b) if i is not None}
            anchors |= ids
            if slot.pinned:
                pinned |= ids | {i for i in hist if i is not None}
        if new_slot is not None:
            anchors.add(new_slot)
        return Refs(anchors=anchors, pinned=pinned, histories=histories)

    def stats(self) -> dict:
        """Bytes by kind (kv, state, meta, journal) and tier, each tensor storage counted once;
        per-stream figures; move counters."""
        by_tier = {t.value: dict.fromkeys(KINDS, 0) for t in ORDER}
        count = {t.value: 0 for t in ORDER}
        seen: set = set()
        for h in self._held.values():
            count[h.tier.value] += 1
            out = by_tier[h.tier.value]
            if h.tier is Tier.DEVICE and h.capsule is not None:
                for kind, tensors in _tensors_by_kind(h.capsule).items():
                    for t in tensors:
                        key = (str(t.device), t.untyped_storage().data_ptr())
                        if key not in seen and t.numel():
                            seen.add(key)
                            out[kind] += t.untyped_storage().nbytes()
            else:
                for kind, n in h.nbytes.items():
                    out[kind] += n
        tiers = {t: {"bytes": sum(k.values()), "bytes_by_kind": k, "capsules": count[t]}
                 for t, k in by_tier.items()}
        return {
            "streams": len(self._slots),
            "capsules": len(self._held),
            "bytes": {kind: sum(by_tier[t][kind] for t in by_tier) for kind in KINDS},
            "tiers": tiers,
            "per_stream": {
                name: {"position": s.position, "history": len(s.held_history), "pinned": s.pinned,
                       "commits": s.commits, "has_base": s.held_base is not None,
                       "tier": s.held_current.tier.value if s.held_current is not None else None}
                for name, s in sorted(self._slots.items())},
            "counters": {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.counters.items()},
        }

    # -- verbs ----------------------------------------------------------------------------
    def create(self, stream: str, base: Capsule | None = None) -> Slot:
        """A new stream at ``base`` (None: empty), which ``reset`` returns to."""
        check_name(stream)
        if stream in self._slots:
            raise CapsuleError(f"stream {stream!r} exists")
        held = self._hold(base)
        slot = Slot(current=held, base=held)
        self._ref(held, 2)
        self._slots[stream] = slot
        return slot

    def install(self, stream: str, capsule: Capsule) -> None:
        """``capsule`` (e.g. loaded from a file) becomes the stream's boundary: a commit on a
        known stream, else a new stream with no history and no base."""
        check_name(stream)
        if stream in self._slots:
            self.commit(stream, capsule)
            return
        held = self._hold(capsule)
        self._ref(held)
        self._slots[stream] = Slot(current=held)

    def commit(self, stream: str, capsule: Capsule | None) -> None:
        """Make ``capsule`` the stream's current boundary; the old one joins the history."""
        slot = self.slot(stream)
        held = self._hold(capsule)
        self._commit_held(slot, held)
        # compaction copies KV: it waits for ``compact`` (the caller's idle time) unless the
        # chain has grown far past max_segments (a caller that is never idle)
        if (held is not None and held.capsule is not None
                and len(held.capsule.kv) > self.max_segments * self.compact_hard_factor):
            self._compact(held)

    def compactable(self) -> list[str]:
        """Streams whose current boundary's KV chain is longer than ``max_segments``."""
        return [name for name, slot in self._slots.items()
                if slot.held_current is not None and slot.held_current.capsule is not None
                and len(slot.held_current.capsule.kv) > self.max_segments]

    def compact(self, stream: str) -> None:
        """Merge the stream's boundary's KV segments (see ``_compact``)."""
        held = self.slot(stream).held_current
        if held is not None and held.capsule is not None and len(held.capsule.kv) > self.max_segments:
            self._compact(held)

    def rollback(self, stream: str, k: int = 1) -> None:
        """Make the boundary ``k`` commits ago current; later ones are discarded."""
        slot = self.slot(stream)
        if k < 1 or k > len(slot.held_history):
            raise CapsuleError(f"cannot roll {stream!r} back {k} "
                               f"(history holds {len(slot.held_history)})")
        for _ in range(k - 1):
            self._unref(slot.held_history.pop())
        old, slot.held_current = slot.held_current, slot.held_history.pop()  # its ref moves along
        self._unref(old)

    def reset(self, stream: str) -> None:
        """Back to the base (or empty), as a commit: history is kept, so a reset rolls back."""
        slot = self.slot(stream)
        if slot.held_current is not slot.held_base:
            base = slot.held_base
            self._ref(base)         # keep it held across the commit
            try:
                self._commit_held(slot, base)
            finally:
                self._unref(base)

    def set_base(self, stream: str, capsule: Capsule | None) -> None:
        slot = self.slot(stream)
        held = self._hold(capsule)
        self._ref(held)
        old, slot.held_base = slot.held_base, held
        self._unref(old)

    def fork(self, source: str, new_stream: str) -> Slot:
        """A new stream starting at ``source``'s current boundary (sharing its capsule)."""
        src = self.slot(source)
        check_name(new_stream)
        if new_stream in self._slots:
            raise CapsuleError(f"stream {new_stream!r} exists")
        slot = Slot(current=src.held_current, base=src.held_base)
        self._ref(src.held_current)
        self._ref(src.held_base)
        self._slots[new_stream] = slot
        return slot

    def pin(self, stream: str, pinned: bool = True) -> None:
        self.slot(stream).pinned = pinned

    def drop(self, stream: str) -> None:
        slot = self.slot(stream)
        if slot.pinned:
            raise CapsuleError(f"stream {stream!r} is pinned; unpin it first")
        del self._slots[stream]
        for h in slot.held():
            self._unref(h)

    # -- moving bytes ------------------------------------------------------------------------
    def promote(self, capsule_id: int, to: Tier = Tier.DEVICE) -> Capsule:
        """Bring a held capsule up to ``to`` (device or host); returns it."""
        h = self._held[capsule_id]
        if ORDER.index(to) > ORDER.index(h.tier) or to is Tier.FILE:
            raise ValueError(f"promote {h.tier.value} -> {to.value} is not up")
        self._move(h, to)
        h.last_used = self._tick()
        assert h.capsule is not None
        return h.capsule

    def demote(self, capsule_id: int, to: Tier) -> None:
        """Move a held capsule down to ``to`` (host, or file when the store has a file tier)."""
        h = self._held[capsule_id]
        if ORDER.index(to) < ORDER.index(h.tier):
            raise ValueError(f"demote {h.tier.value} -> {to.value} is not down")
        if to is Tier.FILE and self.files is None:
            raise CapsuleError("this store has no file tier")
        self._move(h, to)

    def evict(self, capsule_id: int) -> None:
        """Drop a history entry everywhere it is the oldest real one (with any empty entries
        before it), so rollback(k) never skips a boundary."""
        h = self._held.get(capsule_id)
        if h is None:
            return
        for slot in self._slots.values():
            hist = slot.held_history
            if h not in hist or next((x for x in hist if x is not None), None) is not h:
                continue
            while hist:
                head = hist.popleft()
                if head is h:
                    self._unref(h)
                    break
        self.counters["evictions"] += 1

    # -- internals -------------------------------------------------------------------------
    def _commit_held(self, slot: Slot, held: Held | None) -> None:
        self._ref(held)
        old = slot.held_current
        if self.history_depth:
            slot.held_history.append(old)
            self._ref(old)
        while len(slot.held_history) > self.history_depth:
            self._unref(slot.held_history.popleft())
        slot.held_current = held
        self._unref(old)
        slot.commits += 1

    def _trimmed(self, hist: list) -> list:
        return hist[max(0, len(hist) - self.history_depth):]

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _touch(self, h: Held | None) -> None:
        if h is not None:
            h.last_used = self._tick()

    def _hold(self, capsule: Capsule | None) -> Held | None:
        if capsule is None:
            return None
        h = self.record(capsule)
        h.last_used = self._tick()
        self._held.setdefault(h.id, h)
        return h

    def _ref(self, h: Held | None, n: int = 1) -> None:
        if h is not None:
            h.refs += n

    def _unref(self, h: Held | None) -> None:
        if h is not None:
            h.refs -= 1
            if h.refs <= 0:
                self._release(h)

    def _release(self, h: Held) -> None:
        """Forget a capsule nothing refers to any more (removes its tier file)."""
        self._held.pop(h.id, None)
        if h.path is not None and self.files is not None:
            self.files.remove(h.path)
        h.capsule, h.path = None, None

    def _move(self, h: Held, to: Tier) -> None:
        frm = h.tier
        if frm is to:
            return
        if to is Tier.FILE:
            assert self.files is not None and h.capsule is not None
            h.path = self.files.write(h.capsule)      # raises (nothing changed) if it fails
            h.capsule, h.storages = None, {}
        else:
            device = self.device if to is Tier.DEVICE else torch.device("cpu")
            if h.capsule is not None:
                capsule = copy_capsule(h.capsule, device, pin=to is Tier.HOST and self.pin_host)
            else:
                assert self.files is not None and h.path is not None
                capsule = self.files.read(h.path, h.fingerprint, h.id, device)
            h.capsule = capsule
            h.storages = storages(capsule) if to is Tier.DEVICE else {}
            if h.path is not None and self.files is not None:
                self.files.remove(h.path)
                h.path = None
        h.tier = to
        key = "promotions" if ORDER.index(to) < ORDER.index(frm) else "moves"
        path = f"{frm.value}->{to.value}"
        self.counters[key] += 1
        self.counters[f"{key}_by_path"][path] = self.counters[f"{key}_by_path"].get(path, 0) + 1

    def _compact(self, held: Held) -> None:
        """Shorten ``held``'s KV chain by merging runs of segments no other capsule in the store
        ends inside: every holder of a run gets the merged segment in its place, so the old
        segments are freed and no row is held twice. Runs end at every boundary some held
        capsule shares with this chain (history entries, a base, forks), so a history as deep
        as ``max_segments`` leaves the chain as it is."""
        chain = held.capsule.kv
        others = [h for h in self._held.values() if h.tier is Tier.DEVICE and h.capsule is not None]
        shared = {h.id: _shared_prefix(h.capsule.kv, chain) for h in others}
        cuts = sorted({0, len(chain)} | {n for n in shared.values() if 0 < n < len(chain)})
        runs = sorted(((b - a, a, b) for a, b in zip(cuts, cuts[1:]) if b - a >= 2), reverse=True)
        chosen, length = [], len(chain)
        for size, a, b in runs:
            if length <= self.max_segments:
                break
            chosen.append((a, b))
            length -= size - 1
        for a, b in sorted(chosen, reverse=True):   # right to left: earlier indices stay valid
            merged = merge_segments(chain[a:b])
            for h in others:
                if shared[h.id] >= b:
                    h.capsule = h.capsule.with_run_merged(a, b, merged)
                    h.storages = storages(h.capsule)
            self.counters["compactions"] += 1


def _shared_prefix(a: tuple, b: tuple) -> int:
    n = 0
    for x, y in zip(a, b):
        if x is not y:
            break
        n += 1
    return n


def _id(h: Held | None) -> int | None:
    return None if h is None else h.id


def _tensors_by_kind(c: Capsule) -> dict[str, Iterable[torch.Tensor]]:
    return {"kv": [t for seg in c.kv for t in seg.rows.values()], "state": c.state.values(),
            "meta": c.meta_tensors.values(), JOURNAL: [e.embeds for e in c.journal]}
