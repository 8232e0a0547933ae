"""The capsule store: one slot per stream (current boundary, history, base), and its verbs.

Mechanism only: it holds capsules and answers for them; it never runs a model. Verbs that fail
raise ``CapsuleError`` and change nothing.

Slots refer to capsules through ``tiers.Resident`` records, so a capsule can live in the device
tier, the host tier or a file while the slot keeps its place. Reading ``slot.current`` /
``slot.base`` / a history entry (or ``current``, ``rollback``, ``reset``) brings a capsule from a
lower tier back to the device tier (a *promotion*). Without budgets (the default) nothing ever
moves and the store behaves as a plain in-memory store.
"""
from __future__ import annotations

import os
import re
from collections import deque
from typing import Iterator, Sequence

from .capsule import Capsule, CapsuleError
from .tiers import CapsuleBudgetError, Refs, Resident, Tier, TierConfig, TierManager

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    """Stream and capsule names become file names: no separators, no '..', no hidden files."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise CapsuleError(f"invalid capsule name {name!r} (letters, digits, '_', '-', '.'; no '..')")
    return name


class _History(Sequence):
    """A slot's earlier boundaries, newest last (read-only; reading an entry promotes it)."""

    def __init__(self, slot: "Slot") -> None:
        self._slot = slot

    def __len__(self) -> int:
        return len(self._slot._history)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._slot._store._access(r) for r in list(self._slot._history)[i]]
        return self._slot._store._access(self._slot._history[i])

    def __iter__(self) -> Iterator[Capsule | None]:
        for r in list(self._slot._history):
            yield self._slot._store._access(r)


class Slot:
    """Per-stream record. ``current`` None = empty context; ``base`` is what reset returns to."""

    def __init__(self, store: "CapsuleStore", current: Resident | None = None,
                 base: Resident | None = None) -> None:
        self._store = store
        self._current = current
        # earlier boundaries, newest last (None: the empty context, which rollback can reach)
        self._history: deque[Resident | None] = deque()
        self._base = base
        self.pinned = False
        self.commits = 0

    @property
    def current(self) -> Capsule | None:
        return self._store._access(self._current)

    @property
    def base(self) -> Capsule | None:
        return self._store._access(self._base)

    @property
    def history(self) -> _History:
        return _History(self)

    @property
    def position(self) -> int:
        """The current boundary's position, without bringing the capsule back to the device."""
        return self._current.position if self._current is not None else 0

    def tiers(self) -> dict:
        """Where the current boundary, history entries and base are (no promotion)."""
        t = lambda r: None if r is None else r.tier.value  # noqa: E731
        return {"current": t(self._current), "history": [t(r) for r in self._history],
                "base": t(self._base)}

    def _refs(self) -> list[Resident]:
        return [r for r in (self._current, self._base, *self._history) if r is not None]


class CapsuleStore:
    def __init__(self, history_depth: int = 8, tiers: TierConfig | None = None) -> None:
        if history_depth < 0:
            raise ValueError("history_depth must be >= 0")
        self.history_depth = history_depth
        self._slots: dict[str, Slot] = {}
        self.tiers = TierManager(tiers)

    def configure_tiers(self, config: TierConfig) -> None:
        """Set tier budgets (e.g. right after the engine is built). Capsules already held are
        re-planned under the new budgets; refused (``CapsuleBudgetError``) if they cannot fit."""
        old = self.tiers
        new = TierManager(config)
        new.residents, new._clock = old.residents, old._clock
        self.tiers = new
        try:
            plan = new.plan(self._refs())
        except CapsuleBudgetError:
            self.tiers = old
            raise
        self._apply(plan)

    # -- queries --------------------------------------------------------------------------
    def __contains__(self, stream: str) -> bool:
        return stream in self._slots

    def slot(self, stream: str) -> Slot:
        try:
            return self._slots[stream]
        except KeyError:
            raise CapsuleError(f"unknown stream {stream!r}") from None

    def current(self, stream: str) -> Capsule | None:
        return self.slot(stream).current

    def position(self, stream: str) -> int:
        """The stream's boundary position without touching tiers (for diagnostics)."""
        return self.slot(stream).position

    def list(self) -> list[str]:
        return sorted(self._slots)

    def capsules(self) -> list[Capsule]:
        """Every distinct capsule held in memory (device or host tier; current, history, base).

        Capsules in the file tier are not read back for this (``residents()`` lists them all).
        """
        return [r.capsule for r in self.residents() if r.capsule is not None]

    def residents(self) -> list[Resident]:
        seen: dict[int, Resident] = {}
        for slot in self._slots.values():
            for r in slot._refs():
                seen[r.id] = r
        return list(seen.values())

    def stats(self) -> dict:
        capsules = self.capsules()
        # Segments are shared between a stream's history entries: count each tensor once.
        seen: set[int] = set()
        kv = 0
        for c in capsules:
            for seg in c.kv:
                for t in seg.rows.values():
                    if id(t) not in seen:
                        seen.add(id(t))
                        kv += t.numel() * t.element_size()
        state = sum(sum(t.numel() * t.element_size() for t in c.state.values()) for c in capsules)
        ids = [r.id for r in self.residents()]
        return {
            "streams": len(self._slots),
            "capsules": len(ids),
            "bytes": {"kv_unique": kv, "state": state},
            "per_stream": {
                name: {"position": s.position,
                       "history": len(s._history), "pinned": s.pinned, "commits": s.commits,
                       "has_base": s._base is not None,
                       "tier": s._current.tier.value if s._current is not None else None}
                for name, s in sorted(self._slots.items())
            },
            "tiers": self.tiers.counts(ids),
            "tier_counters": {k: (dict(v) if isinstance(v, dict) else v)
                              for k, v in self.tiers.counters.items()},
        }

    # -- verbs ----------------------------------------------------------------------------
    def create(self, stream: str, base: Capsule | None = None) -> Slot:
        check_name(stream)
        if stream in self._slots:
            raise CapsuleError(f"stream {stream!r} exists")
        res, plan = self._admit(base, lambda r: self._refs(extra_anchor=r))
        slot = Slot(self, current=res, base=res)
        self._ref(res, 2)
        self._slots[stream] = slot
        self._apply(plan)
        return slot

    def commit(self, stream: str, capsule: Capsule | None) -> None:
        """Make ``capsule`` the stream's current boundary; the old one joins the history.

        With budgets, refused (``CapsuleBudgetError``, nothing changed) when the new capsule
        cannot be placed: oversized, or every tier full of pinned capsules and current boundaries.
        """
        slot = self.slot(stream)
        old = slot._current
        hist = list(slot._history)
        if self.history_depth:   # an empty context (None) is a boundary too: rollback reaches it
            hist.append(old)
        popped = hist[:max(0, len(hist) - self.history_depth)]
        hist = hist[len(popped):]
        res, plan = self._admit(capsule, lambda r: self._refs(replace={stream: (r, hist)}))
        # the plan is feasible: now change the slot
        self._ref(res)
        if self.history_depth:
            slot._history.append(old)
            self._ref(old)
        while len(slot._history) > self.history_depth:
            self._unref(slot._history.popleft())
        slot._current = res
        self._unref(old)
        slot.commits += 1
        self._apply(plan)

    def rollback(self, stream: str, k: int = 1) -> Capsule | None:
        """Make the boundary ``k`` commits ago current; later ones are discarded."""
        slot = self.slot(stream)
        if k < 1 or k > len(slot._history):
            raise CapsuleError(f"cannot roll {stream!r} back {k} (history holds {len(slot._history)})")
        for _ in range(k - 1):
            self._unref(slot._history.pop())
        target = slot._history.pop()
        old, slot._current = slot._current, target  # the history's reference moves to current
        self._unref(old)
        return slot.current

    def reset(self, stream: str) -> Capsule | None:
        """Back to the base (or empty). History is kept, so a reset can be rolled back."""
        slot = self.slot(stream)
        if slot._current is not slot._base:
            base = slot._base
            self.commit(stream, base.capsule if base is not None and base.capsule is not None
                        else self._access(base))
        return slot.current

    def set_base(self, stream: str, capsule: Capsule | None) -> None:
        slot = self.slot(stream)
        res, plan = self._admit(capsule, lambda r: self._refs(base={stream: r}))
        self._ref(res)
        old, slot._base = slot._base, res
        self._unref(old)
        self._apply(plan)

    def fork(self, source: str, new_stream: str) -> Slot:
        """A new stream starting at ``source``'s current boundary (sharing its tensors)."""
        src = self.slot(source)
        check_name(new_stream)
        if new_stream in self._slots:
            raise CapsuleError(f"stream {new_stream!r} exists")
        slot = Slot(self, current=src._current, base=src._base)
        self._ref(src._current)
        self._ref(src._base)
        self._slots[new_stream] = slot
        return slot

    def pin(self, stream: str, pinned: bool = True) -> None:
        self.slot(stream).pinned = pinned

    def drop(self, stream: str) -> None:
        slot = self.slot(stream)
        if slot.pinned:
            raise CapsuleError(f"stream {stream!r} is pinned; unpin it first")
        del self._slots[stream]
        for r in slot._refs():
            self._unref(r)

    # -- files -----------------------------------------------------------------------------
    def save(self, stream: str, directory: str | os.PathLike, layout, name: str | None = None):
        """Write the stream's current boundary as ``<name or stream>.capsule.safetensors``."""
        from .files import save_capsule

        capsule = self.current(stream)
        if capsule is None:
            raise CapsuleError(f"stream {stream!r} has no boundary to save (empty context)")
        return save_capsule(capsule, directory, name or stream, layout)

    def load(self, stream: str, source, expected, layout, *, device="cpu") -> Capsule:
        """Load a capsule file (``path`` or ``(directory, name)``), verified, as the stream's new
        current boundary (creating the stream if needed). A refused load changes nothing."""
        from .files import load_capsule

        check_name(stream)
        capsule = load_capsule(source, expected, layout, device=device)
        if stream in self._slots:
            self.commit(stream, capsule)
        else:  # a new stream starts at the loaded boundary: no history, no base
            res, plan = self._admit(capsule, lambda r: self._refs(extra_anchor=r))
            self._ref(res)
            self._slots[stream] = Slot(self, current=res)
            self._apply(plan)
        return capsule

    # -- internals -------------------------------------------------------------------------
    def _access(self, res: Resident | None) -> Capsule | None:
        """The capsule behind ``res``, brought to the device tier if it sits lower."""
        if res is None:
            return None
        res.last_used = self.tiers.tick()
        if res.tier is Tier.DEVICE:
            return res.capsule
        refs = self._refs()
        for target in (Tier.DEVICE, Tier.HOST):
            if target is Tier.HOST and res.tier is Tier.HOST:
                return res.capsule  # no room on the device: restore straight from host memory
            try:
                plan = self.tiers.plan(refs, promote={res.id: target}, keep={res.id})
            except CapsuleBudgetError:
                continue
            plan.moves[res.id] = target
            self._apply(plan)
            if res.tier is target:
                return res.capsule
        self.tiers.counters["refused"] += 1
        raise CapsuleBudgetError(f"capsule at position {res.position} is in the file tier and "
                                 "neither device nor host budget has room to bring it back")

    def _admit(self, capsule: Capsule | None, refs_for):
        """Resident for a capsule about to be referenced, and the plan that makes room for it
        (for the caller to apply once it changed the slot). Raises before anything changes."""
        if capsule is None:
            return None, None
        known = self.tiers.residents.get(capsule.id)
        if known is None:
            self.tiers.check_size(capsule)
            res = self.tiers.new_resident(capsule)
        else:
            res = known
            res.last_used = self.tiers.tick()
        try:
            plan = self.tiers.plan(refs_for(res), extra=res if known is None else None)
        except CapsuleBudgetError:
            self.tiers.counters["refused"] += 1
            raise
        if known is None:
            self.tiers.residents[res.id] = res
        return res, plan

    def _apply(self, plan) -> None:
        if plan is None:
            return
        for i in plan.drops:
            res = self.tiers.residents.get(i)
            if res is None:
                continue
            for slot in self._slots.values():
                # the planner drops a slot's oldest real entry, with any empty (None) ones before it
                if res not in slot._history:
                    continue
                while slot._history:
                    head = slot._history.popleft()
                    if head is res:
                        res.refs -= 1
                        break
            self.tiers.counters["evictions"] += 1
            if res.refs <= 0:
                self.tiers.release(res)
        self.tiers.execute(plan)

    def _ref(self, res: Resident | None, n: int = 1) -> None:
        if res is not None:
            res.refs += n

    def _unref(self, res: Resident | None) -> None:
        if res is not None:
            res.refs -= 1
            if res.refs <= 0:
                self.tiers.release(res)

    def _refs(self, *, replace: dict | None = None, base: dict | None = None,
              extra_anchor: Resident | None = None) -> Refs:
        """References as the planner sees them, optionally with one slot's future state."""
        anchors: set[int] = set()
        pinned: set[int] = set()
        histories: list[list[int]] = []
        for name, slot in self._slots.items():
            cur, hist, b = slot._current, list(slot._history), slot._base
            if replace and name in replace:
                cur, hist = replace[name]
            if base and name in base:
                b = base[name]
            ids = [None if r is None else r.id for r in hist]
            histories.append(ids)
            for r in (cur, b):
                if r is not None:
                    anchors.add(r.id)
            if slot.pinned:
                pinned.update(i for i in ids if i is not None)
                pinned.update(r.id for r in (cur, b) if r is not None)
        if extra_anchor is not None:
            anchors.add(extra_anchor.id)
        return Refs(anchors=anchors, pinned=pinned, histories=histories)

