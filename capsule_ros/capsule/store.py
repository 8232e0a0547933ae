"""The capsule store: one slot per stream (current boundary, history, base), and its verbs.

Mechanism only: it holds capsules and answers for them; it never runs a model. Verbs that fail
raise ``CapsuleError`` and change nothing.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

from .capsule import Capsule, CapsuleError

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    """Stream and capsule names become file names: no separators, no '..', no hidden files."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise CapsuleError(f"invalid capsule name {name!r} (letters, digits, '_', '-', '.'; no '..')")
    return name


@dataclass
class Slot:
    current: Capsule | None = None          # None = empty context
    history: deque = field(default_factory=deque)  # earlier boundaries, newest last
    base: Capsule | None = None             # what reset returns to (None = empty)
    pinned: bool = False
    commits: int = 0


class CapsuleStore:
    def __init__(self, history_depth: int = 8) -> None:
        if history_depth < 0:
            raise ValueError("history_depth must be >= 0")
        self.history_depth = history_depth
        self._slots: dict[str, Slot] = {}

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

    def list(self) -> list[str]:
        return sorted(self._slots)

    def capsules(self) -> list[Capsule]:
        """Every distinct capsule held (current, history, base)."""
        seen: dict[int, Capsule] = {}
        for slot in self._slots.values():
            for c in (slot.current, slot.base, *slot.history):
                if c is not None:
                    seen[c.id] = c
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
        return {
            "streams": len(self._slots),
            "capsules": len(capsules),
            "bytes": {"kv_unique": kv, "state": state},
            "per_stream": {
                name: {"position": s.current.position if s.current else 0,
                       "history": len(s.history), "pinned": s.pinned, "commits": s.commits,
                       "has_base": s.base is not None}
                for name, s in sorted(self._slots.items())
            },
        }

    # -- verbs ----------------------------------------------------------------------------
    def create(self, stream: str, base: Capsule | None = None) -> Slot:
        check_name(stream)
        if stream in self._slots:
            raise CapsuleError(f"stream {stream!r} exists")
        slot = Slot(current=base, base=base)
        self._slots[stream] = slot
        return slot

    def commit(self, stream: str, capsule: Capsule) -> None:
        slot = self.slot(stream)
        if slot.current is not None and self.history_depth:
            slot.history.append(slot.current)
            while len(slot.history) > self.history_depth:
                slot.history.popleft()
        slot.current = capsule
        slot.commits += 1

    def rollback(self, stream: str, k: int = 1) -> Capsule | None:
        """Make the boundary ``k`` commits ago current; later ones are discarded."""
        slot = self.slot(stream)
        if k < 1 or k > len(slot.history):
            raise CapsuleError(f"cannot roll {stream!r} back {k} (history holds {len(slot.history)})")
        for _ in range(k - 1):
            slot.history.pop()
        slot.current = slot.history.pop()
        return slot.current

    def reset(self, stream: str) -> Capsule | None:
        """Back to the base (or empty). History is kept, so a reset can be rolled back."""
        slot = self.slot(stream)
        if slot.current is not slot.base:
            self.commit(stream, slot.base)
        return slot.current

    def set_base(self, stream: str, capsule: Capsule | None) -> None:
        self.slot(stream).base = capsule

    def fork(self, source: str, new_stream: str) -> Slot:
        """A new stream starting at ``source``'s current boundary (sharing its tensors)."""
        src = self.slot(source)
        check_name(new_stream)
        if new_stream in self._slots:
            raise CapsuleError(f"stream {new_stream!r} exists")
        slot = Slot(current=src.current, base=src.base)
        self._slots[new_stream] = slot
        return slot

    def pin(self, stream: str, pinned: bool = True) -> None:
        self.slot(stream).pinned = pinned

    def drop(self, stream: str) -> None:
        slot = self.slot(stream)
        if slot.pinned:
            raise CapsuleError(f"stream {stream!r} is pinned; unpin it first")
        del self._slots[stream]
